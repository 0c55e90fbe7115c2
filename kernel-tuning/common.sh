#!/usr/bin/env bash
# Shared by apply.sh and check.sh (sourced): reads the recommended settings and compares them
# with the running kernel's. Changes nothing.
set -euo pipefail

KT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SYSCTL_CONF=$KT_DIR/sysctl.d/90-ckpool-rs.conf
LIMITS_CONF=$KT_DIR/limits.d/90-ckpool-rs.conf

# recommended: prints "key<TAB>value" for every setting in the sysctl file.
recommended() {
	local line key value
	while IFS= read -r line || [[ -n $line ]]; do
		[[ $line =~ ^[[:space:]]*(#|$) ]] && continue
		key=${line%%=*}
		value=${line#*=}
		key=$(printf '%s' "$key" | tr -d '[:space:]')
		value=$(printf '%s' "$value" | tr -s '[:space:]' ' ' | sed 's/^ //; s/ $//')
		printf '%s\t%s\n' "$key" "$value"
	done <"$SYSCTL_CONF"
}

# recommended_nofile: the hard nofile value for '*' in the limits file.
recommended_nofile() {
	awk '$1 == "*" && $2 == "hard" && $3 == "nofile" { print $4; exit }' "$LIMITS_CONF"
}

# current KEY: the running value (whitespace squeezed), or nothing if the key does not exist.
current() {
	local path=/proc/sys/${1//.//}
	[[ -r $path ]] || return 1
	tr -s '[:space:]' ' ' <"$path" | sed 's/^ //; s/ $//'
}

# mode KEY: how the running value is compared with the recommendation:
#   min    every field at least the recommended one (a bigger machine may have more)
#   max    at most (timeouts)
#   range  a port range that covers the recommended one
#   eq     exactly (flags, and buffer defaults that are a choice rather than a floor)
mode() {
	case $1 in
	net.ipv4.ip_local_port_range) echo range ;;
	net.ipv4.tcp_fin_timeout | net.ipv4.tcp_keepalive_time) echo max ;;
	net.ipv4.tcp_tw_reuse | net.ipv4.tcp_syncookies | net.ipv4.tcp_rmem | net.ipv4.tcp_wmem) echo eq ;;
	*) echo min ;;
	esac
}

# verdict MODE CURRENT RECOMMENDED: prints ok, low, high or differs.
verdict() {
	local m=$1 cur=$2 want=$3
	local -a c w
	read -r -a c <<<"$cur"
	read -r -a w <<<"$want"
	if [[ ${#c[@]} -ne ${#w[@]} ]]; then
		echo differs
		return
	fi
	local i
	case $m in
	eq)
		[[ $cur == "$want" ]] && echo ok || echo differs
		;;
	range)
		if ((c[0] <= w[0] && c[1] >= w[1])); then echo ok; else echo low; fi
		;;
	max)
		for i in "${!w[@]}"; do
			if ((c[i] > w[i])); then
				echo high
				return
			fi
		done
		echo ok
		;;
	*)
		for i in "${!w[@]}"; do
			if ((c[i] < w[i])); then
				echo low
				return
			fi
		done
		echo ok
		;;
	esac
}
