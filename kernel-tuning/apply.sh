#!/usr/bin/env bash
# Installs and applies kernel-tuning's settings: copies sysctl.d/90-ckpool-rs.conf to
# /etc/sysctl.d/ and limits.d/90-ckpool-rs.conf to /etc/security/limits.d/ (when they differ),
# then sets every running value that check.sh would not call ok. Values already better than
# recommended (e.g. a bigger fs.file-max) are left alone. Idempotent: a second run changes
# nothing and says so. Prints every change.
#
# Usage: sudo kernel-tuning/apply.sh [--dry-run]
#   --dry-run  print what would change, change nothing (no root needed)
#
# The open-files limit applies to new login sessions; systemd services need LimitNOFILE= in
# their unit (README.md).
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

dry=""
case ${1:-} in
--dry-run) dry=1 ;;
"") ;;
*)
	echo "usage: $0 [--dry-run]" >&2
	exit 2
	;;
esac
if [[ -z $dry && $(id -u) -ne 0 ]]; then
	echo "apply.sh needs root (or use --dry-run)" >&2
	exit 1
fi

changes=0
say() { printf '%s\n' "$*"; }

# install SRC DEST: copy when the content differs.
install_file() {
	local src=$1 dest=$2
	if [[ -f $dest ]] && cmp -s "$src" "$dest"; then
		say "unchanged  $dest"
		return
	fi
	changes=$((changes + 1))
	if [[ -n $dry ]]; then
		say "would install  $dest"
	else
		mkdir -p "$(dirname "$dest")"
		install -m 0644 "$src" "$dest"
		say "installed  $dest"
	fi
}

install_file "$SYSCTL_CONF" /etc/sysctl.d/90-ckpool-rs.conf
install_file "$LIMITS_CONF" /etc/security/limits.d/90-ckpool-rs.conf

while IFS=$'\t' read -r key want; do
	if ! cur=$(current "$key"); then
		say "skipped    $key (not present on this kernel; module not loaded?)"
		continue
	fi
	v=$(verdict "$(mode "$key")" "$cur" "$want")
	if [[ $v == ok ]]; then
		say "ok         $key = $cur"
		continue
	fi
	changes=$((changes + 1))
	if [[ -n $dry ]]; then
		say "would set  $key: $cur -> $want"
	elif sysctl -q -w "$key=$want" >/dev/null; then
		say "changed    $key: $cur -> $(current "$key")"
	else
		say "FAILED     $key: $cur -> $want (read-only in this container?)"
	fi
done < <(recommended)

if ((changes == 0)); then
	say "nothing to change"
elif [[ -n $dry ]]; then
	say "$changes change(s) would be made"
else
	say "$changes change(s) made; log in again for the open-files limit"
fi
