#!/usr/bin/env bash
# Per CUDA kernel of the installed velodiff extension: how many tensor-core instructions of each kind its SASS
# holds (IGMMA / QGMMA: Hopper's warpgroup MMA on int8 / fp8; IMMA / QMMA / HMMA: mma.sync on int / fp8 / fp16)
# and how many local-memory accesses (LDL / STL: spills or a register array indexed at run time). Needs cuobjdump.
#   usage: bash bench/sass_summary.sh [path/to/_C.so]
set -euo pipefail
py=${PYTHON:-python3}
so=${1:-$($py -c "import velodiff._C as m; print(m.__file__)")}
cuobjdump --dump-sass "$so" | awk '
  /Function :/ { name = $3 }
  name != "" {
    for (i = 1; i <= NF; i++) {
      op = $i; sub(/\..*/, "", op)
      if (op ~ /^(IGMMA|QGMMA|HGMMA|IMMA|HMMA|QMMA|LDL|STL)$/) count[name " " op]++
    }
  }
  END { for (k in count) print count[k], k }' | sort -k2,2 -k3,3 | awk '{ printf "%-8s %6d  %s\n", $3, $1, $2 }'
