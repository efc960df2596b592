#!/usr/bin/env bash
# Build sni-proxy.
#   ./build.sh           build the eBPF objects (every bpf/*.bpf.c); same as `./build.sh bpf`
#   ./build.sh binary    build the binary ./sni-proxy (deno compile; embeds the bpf/*.bpf.o)
#   ./build.sh all       both
#   ./build.sh --check   check the toolchain (clang, BPF target, libbpf headers); exit 0 or 1
# Environment: CLANG (default clang), DENO (default deno, then .tools/node_modules/.bin/deno),
# DENORT_BIN (a local denort runtime for `deno compile` on machines that cannot download it; the
# compiled file must answer --version as sni-proxy, else it is deleted and the build fails).
set -euo pipefail

# a relative DENORT_BIN means relative to where build.sh was run from, not to the checkout
case "${DENORT_BIN:-}" in "" | /*) ;; *) DENORT_BIN="$PWD/$DENORT_BIN" ;; esac
cd "$(dirname "$0")"
CLANG="${CLANG:-clang}"
BPF_SRC=bpf/sockmap.bpf.c
BPF_OBJ=bpf/sockmap.bpf.o
# Debian/Ubuntu keep asm/types.h under the multiarch dir, which -target bpf does not search.
MULTIARCH_INC="/usr/include/$(uname -m)-linux-gnu"

fail() { echo "build.sh: $*" >&2; exit 1; }

check_toolchain() {
	local ok=0
	if ! command -v "$CLANG" >/dev/null 2>&1; then
		echo "MISSING clang ($CLANG): install it (Debian: apt-get install -y clang llvm)"; ok=1
	elif ! "$CLANG" -print-targets 2>/dev/null | grep -w bpf >/dev/null; then
		echo "MISSING the BPF target in $CLANG: install an LLVM build with the bpf backend"; ok=1
	else
		echo "ok      clang: $("$CLANG" --version | head -n1)"
	fi
	if [ -f /usr/include/bpf/bpf_helpers.h ]; then
		echo "ok      libbpf headers: /usr/include/bpf"
	else
		echo "MISSING libbpf headers (bpf/bpf_helpers.h): apt-get install -y libbpf-dev"; ok=1
	fi
	if [ -f /usr/include/linux/bpf.h ]; then
		echo "ok      kernel uapi headers: /usr/include/linux/bpf.h"
	else
		echo "MISSING linux uapi headers (linux/bpf.h): apt-get install -y linux-libc-dev"; ok=1
	fi
	if [ -f "$MULTIARCH_INC/asm/types.h" ] || [ -f /usr/include/asm/types.h ]; then
		echo "ok      asm/types.h"
	else
		echo "MISSING asm/types.h: apt-get install -y linux-libc-dev (or gcc-multilib)"; ok=1
	fi
	# no grep -q: under pipefail its early exit would SIGPIPE ldconfig and fail the check at random
	if ldconfig -p 2>/dev/null | grep 'libbpf\.so\.1' >/dev/null; then
		echo "ok      runtime libbpf.so.1"
	else
		echo "MISSING runtime libbpf.so.1 (needed to run the fast path): apt-get install -y libbpf1"; ok=1
	fi
	if [ "$ok" -eq 0 ]; then echo "toolchain OK"; else echo "toolchain incomplete"; fi
	return "$ok"
}

# Every bpf/*.bpf.c becomes bpf/*.bpf.o (sockmap fast path, XDP filter, ...).
build_bpf() {
	command -v "$CLANG" >/dev/null 2>&1 || fail "clang not found; run ./build.sh --check"
	local src obj
	for src in bpf/*.bpf.c; do
		obj="${src%.c}.o"
		"$CLANG" -O2 -g -target bpf -Wall -Werror -I"$MULTIARCH_INC" -c "$src" -o "$obj.tmp" ||
			{ rm -f "$obj.tmp"; fail "compiling $src failed"; }
		mv -f "$obj.tmp" "$obj"
		echo "built $obj"
	done
}

find_deno() {
	if [ -n "${DENO:-}" ]; then echo "$DENO"; return; fi
	if command -v deno >/dev/null 2>&1; then echo deno; return; fi
	if [ -x .tools/node_modules/.bin/deno ]; then echo .tools/node_modules/.bin/deno; return; fi
	fail "deno not found: install it (npm install deno@2.9) or set DENO=/path/to/deno"
}

# Refuses a DENORT_BIN that cannot be a denort runtime before compiling with it.
check_denort_bin() {
	[ -n "${DENORT_BIN:-}" ] || return 0
	[ -e "$DENORT_BIN" ] || fail "DENORT_BIN=$DENORT_BIN does not exist (set it to a denort runtime)"
	[ -f "$DENORT_BIN" ] || fail "DENORT_BIN=$DENORT_BIN is not a file (set it to a denort runtime)"
	[ -x "$DENORT_BIN" ] || fail "DENORT_BIN=$DENORT_BIN is not executable (set it to a denort runtime)"
}

# Checks that the binary at $1 is sni-proxy: `--version` answers "sni-proxy ...". A DENORT_BIN
# that is the deno CLI compiles without error into a file that only behaves as `deno`.
verify_binary() {
	local bin="$1" version
	version="$(timeout 30 "$bin" --version 2>&1 | head -n1)" || true
	case "$version" in
	"sni-proxy "*) return 0 ;;
	"deno "*)
		rm -f "$bin"
		[ -n "${DENORT_BIN:-}" ] && fail "DENORT_BIN=$DENORT_BIN is the deno CLI, not denort:" \
			"the compiled file only behaves as deno; set DENORT_BIN to the denort runtime of this deno version"
		fail "deno compile made a file that only behaves as deno ('$version'); no ./sni-proxy built"
		;;
	*)
		rm -f "$bin"
		fail "the compiled binary does not answer --version as sni-proxy (it printed '$version')" \
			"${DENORT_BIN:+; DENORT_BIN=$DENORT_BIN is not a denort runtime for this deno}; no ./sni-proxy built"
		;;
	esac
}

# Compiles into a scratch file, checks it, and only then replaces ./sni-proxy.
compile_binary() {
	local deno log out=.sni-proxy.build
	deno="$(find_deno)"
	[ -f "$BPF_OBJ" ] && [ -f bpf/xdp.bpf.o ] && [ -f bpf/quic.bpf.o ] && [ -f bpf/quic_reuseport.bpf.o ] || build_bpf
	check_denort_bin
	# deno compile reads DENORT_BIN from the environment; an empty value would be taken as a path
	[ -n "${DENORT_BIN:-}" ] || unset DENORT_BIN
	log="$(mktemp)"
	rm -f "$out"
	if ! "$deno" compile -A --unstable-net --no-code-cache --v8-flags=--max-semi-space-size=4 --include "$BPF_OBJ" --include bpf/xdp.bpf.o --include bpf/quic.bpf.o --include bpf/quic_reuseport.bpf.o -o "$out" main.ts 2>&1 |
		tee "$log"; then
		if grep -qiE 'denort|download|fetch|network|dns|connect' "$log"; then
			echo "build.sh: deno compile could not fetch the denort runtime; download denort" \
				"for this deno version elsewhere and set DENORT_BIN=/path/to/denort" >&2
		fi
		rm -f "$log" "$out"
		fail "deno compile failed"
	fi
	rm -f "$log"
	verify_binary "./$out"
	mv -f "$out" sni-proxy
	echo "built ./sni-proxy"
}

case "${1:-bpf}" in
--check) check_toolchain ;;
bpf) build_bpf ;;
binary) compile_binary ;;
all) build_bpf && compile_binary ;;
-h | --help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' ;;
*) fail "unknown argument '$1' (use --check, bpf, binary or nothing)" ;;
esac
