#!/usr/bin/env bash
# Writes the LINUXDOC development corpus used in docs/results.md: every
# Documentation/**/*.rst.gz of Debian's linux-doc-6.1 outside translations/,
# decompressed, keeping its path below Documentation/ (the held-out choice
# hashes these relative paths, so the layout must not change).
#   apt-get install linux-doc-6.1 && bash benchmarks/linuxdoc_corpus.sh OUT
set -euo pipefail
out=${1:?usage: linuxdoc_corpus.sh OUT_FOLDER}
src=/usr/share/doc/linux-doc-6.1/Documentation
[ -d "$src" ] || { echo "error: $src not found; apt-get install linux-doc-6.1" >&2; exit 2; }
cd "$src"
find . -name '*.rst.gz' -not -path './translations/*' -print0 | sort -z |
while IFS= read -r -d '' f; do
    dest="$out/${f%.gz}"
    mkdir -p "$(dirname "$dest")"
    zcat "$f" > "$dest"
done
echo "$(find "$out" -type f | wc -l) files, $(du -sm "$out" | cut -f1) MB in $out"
