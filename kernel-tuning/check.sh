#!/usr/bin/env bash
# Reports this machine's kernel settings against kernel-tuning's recommendations as a table.
# Needs no root and changes nothing.
#
# Usage: kernel-tuning/check.sh [--strict]
#   --strict  exit 1 when any setting is not as recommended (default: always exit 0)
#
# Status: ok; LOW (below the recommended floor); HIGH (a timeout above the recommendation);
# DIFFERS (a flag or buffer default set otherwise); n/a (the key does not exist here, e.g.
# nf_conntrack when no firewall module is loaded).
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

strict=""
case ${1:-} in
--strict) strict=1 ;;
"") ;;
*)
	echo "usage: $0 [--strict]" >&2
	exit 2
	;;
esac

bad=0
row() { printf '%-32s %-26s %-26s %s\n' "$1" "$2" "$3" "$4"; }
row "setting" "current" "recommended" "status"
row "-------" "-------" "-----------" "------"
while IFS=$'\t' read -r key want; do
	if ! cur=$(current "$key"); then
		row "$key" "-" "$want" "n/a"
		continue
	fi
	v=$(verdict "$(mode "$key")" "$cur" "$want")
	[[ $v == ok ]] || bad=$((bad + 1))
	[[ $v == ok ]] || v=${v^^}
	row "$key" "$cur" "$want" "$v"
done < <(recommended)

nofile=$(recommended_nofile)
for kind in soft hard; do
	if [[ $kind == soft ]]; then lim=$(ulimit -Sn); else lim=$(ulimit -Hn); fi
	if [[ $lim == unlimited ]] || ((lim >= nofile)); then
		v=ok
	else
		v=LOW
		bad=$((bad + 1))
	fi
	row "nofile $kind (this shell)" "$lim" "$nofile" "$v"
done

echo
if ((bad == 0)); then
	echo "all settings as recommended"
else
	echo "$bad setting(s) differ from the recommendation (sudo kernel-tuning/apply.sh sets them)"
fi
if [[ -n $strict ]] && ((bad > 0)); then
	exit 1
fi
