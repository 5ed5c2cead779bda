#!/bin/sh
# Run pytest (or any command after `--`) with every generated module built under AddressSanitizer
# and UndefinedBehaviorSanitizer (CONVDSL_SANITIZE=1, a cache of its own; or the checks that
# CONVDSL_SANITIZE names, a -fsanitize= list holding `address`). An ASan-built extension can
# only be loaded into a process that starts with libasan, hence LD_PRELOAD.
#   tests/sanitize.sh tests/e2e/test_examples.py -x        # pytest arguments
#   tests/sanitize.sh -- python examples/train_digits.py    # any command
# Leak detection is off (the Python interpreter itself "leaks" at exit); any other report
# fails the run: ASan aborts on its first error, UBSan halts too.
set -eu
CC=${CC:-cc}
ASAN_LIB=$("$CC" -print-file-name=libasan.so)
case "$ASAN_LIB" in
    /*) ;;
    *) echo "sanitize.sh: $CC has no libasan.so" >&2; exit 2 ;;
esac
export CONVDSL_SANITIZE="${CONVDSL_SANITIZE:-1}"      # 1: address,undefined; or a -fsanitize= list with address
export CONVDSL_CACHE_DIR="${CONVDSL_SANITIZE_CACHE_DIR:-${TMPDIR:-/tmp}/convdsl-sanitize-cache}"
export LD_PRELOAD="$ASAN_LIB${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:${UBSAN_OPTIONS:-}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
if [ "${1:-}" = "--" ]; then
    shift
    exec "$@"
fi
exec "${PYTHON:-python}" -m pytest "$@"
