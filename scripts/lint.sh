#!/usr/bin/env bash
# lint.sh - the static checks CI runs after the tests (.ci/run), from the repository root:
#   ruff check            lint python/, tests/, benchmarks/, examples/, cuda/generate.py, setup.py
#   ruff format --check   their formatting
#   mypy python/pagedflash
#   clang-format          --dry-run --Werror over csrc/, cuda/, tests/c, tests/cuda, leaving out the
#                         generated files (cuda/inst/, cuda/attn/sm90_wgmma.inc: cuda/generate.py)
#                         and the vendored DLPack ABI (csrc/py/pf_dlpack.h)
# The settings are in pyproject.toml ([tool.ruff], [tool.mypy]) and .clang-format; the tool versions
# CI installs are pinned in .ci/run. Every check runs; the exit status is non-zero if any found
# something. FIX=1 first applies what can be applied (ruff check --fix --unsafe-fixes: the unsafe
# ones here are typing.List/Dict/Tuple -> list/dict/tuple and collections.abc imports, safe on
# Python 3.9; ruff format; clang-format -i), then checks.
set -uo pipefail
cd "$(dirname "$0")/.."

status=0
step() {
  echo "== $*"
  "$@" || { status=1; echo "== FAILED: $*"; }
}
need() {
  command -v "$1" > /dev/null || { echo "lint: $1 not found (CI installs it: .ci/run)" >&2; status=1; return 1; }
}

# the C/CUDA files to check: tracked and new (untracked, not ignored) files, else all files without git
c_files() {
  { git ls-files --cached --others --exclude-standard -- csrc cuda tests/c tests/cuda 2> /dev/null ||
      find csrc cuda tests/c tests/cuda -type f; } |
    grep -E '\.(c|h|cc|cpp|hpp|cu|cuh)$' |
    grep -v -E '^cuda/inst/|^cuda/attn/sm90_wgmma\.inc$|^csrc/py/pf_dlpack\.h$' |
    sort -u
}
CFILES=()
while IFS= read -r f; do CFILES+=("$f"); done < <(c_files)

# clang-format (23) misreads a comparison inside a kernel launch's <<< >>> as template brackets and
# writes `k < < < n > 0 ? n : 1, ... >>> (...)`, which does not compile: such a launch must
# parenthesize the expression, `<<<(n > 0 ? n : 1), ...>>>`.
launch_check() {
  local hits
  hits=$(grep -nE '<<<[^()]*[^<>][<>][^<>]' "${CFILES[@]}" 2> /dev/null | grep -E '\.(cu|cuh|h)[:]')
  [[ -z $hits ]] && return 0
  echo "lint: comparisons inside <<< >>> that clang-format would break; parenthesize them:" >&2
  echo "$hits" >&2
  return 1
}

if [[ ${FIX:-0} == 1 ]]; then
  need ruff && { ruff check --fix --unsafe-fixes; ruff format; }
  if need clang-format && [[ ${#CFILES[@]} -gt 0 ]]; then
    if launch_check; then clang-format -i "${CFILES[@]}"; else echo "lint: clang-format -i not run" >&2; fi
  fi
fi

if need ruff; then
  step ruff check
  step ruff format --check
fi
need mypy && step mypy python/pagedflash
if need clang-format; then
  echo "== kernel launches clang-format would break"
  launch_check || status=1
  echo "== clang-format --dry-run --Werror (${#CFILES[@]} files)"
  if [[ ${#CFILES[@]} -gt 0 ]]; then
    out=$(clang-format --dry-run --Werror "${CFILES[@]}" 2>&1)
    if [[ $? != 0 ]]; then
      status=1
      # the first findings, then the lines each file would change
      printf '%s\n' "$out" | head -n "${CLANG_FORMAT_SHOW:-30}"
      for f in "${CFILES[@]}"; do
        n=$(clang-format "$f" | diff "$f" - | grep -c '^<')
        [[ $n -gt 0 ]] && echo "   $f: $n lines to reformat"
      done
      echo "== FAILED: clang-format (FIX=1 scripts/lint.sh, or clang-format -i on the files above)"
    fi
  fi
fi
[[ $status == 0 ]] && echo "lint: clean" || echo "lint: findings above"
exit $status
