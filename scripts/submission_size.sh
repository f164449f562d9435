#!/usr/bin/env bash
# What a stop would submit, against the limits a submission must stay under: the commits since
# BASE packed (512 MiB) and their diffs added up as text (256 MiB; a binary file's diff is its
# compressed bytes in base85, forward and reverse for a changed file). Over either, the whole
# submission is refused and none of its commits land (stop 22, 2026-12-07: two commits of the
# 77 MB 128-wide checkpoint, about 165 MiB of diff each). An estimate: merges show no diff here.
# Run it before stopping:
#   bash scripts/submission_size.sh BASE     # BASE: the commit the session started from
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: scripts/submission_size.sh BASE (the commit this session started from)}
git rev-parse --verify -q "$base^{commit}" >/dev/null || { echo "submission_size: $base: not a commit" >&2; exit 2; }
diff_bytes=$(git log --format= -p --binary "$base..HEAD" | wc -c)
pack_bytes=$(git rev-list --objects "$base..HEAD" | git pack-objects --stdout -q | wc -c) ||
  { echo "submission_size: git pack-objects failed" >&2; exit 2; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "commits since $base: $(git rev-list --count "$base..HEAD")"
echo "diffs as text: $(mib "$diff_bytes") of 256 MiB"
echo "packed:        $(mib "$pack_bytes") of 512 MiB"
echo "largest diffs:"
for c in $(git rev-list "$base..HEAD"); do
  echo "$(git show --format= --binary "$c" | wc -c) $(git log -1 --format='%h %s' "$c" | cut -c1-70)"
done | sort -rn | head -5 | while read -r bytes rest; do echo "  $(mib "$bytes")  $rest"; done
if (( diff_bytes > 256 * 1048576 || pack_bytes > 512 * 1048576 )); then
  echo "submission_size: over a limit: nothing would land; drop or squash the large commits" >&2
  exit 1
fi
