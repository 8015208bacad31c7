#!/bin/bash
# usage: scripts/bench_scale.sh BIN N TAG   — synth → reconstruct (one-process and P=8) → pack, /usr/bin/time -v per process
set -u
B=$1; N=$2; TAG=$3; D=${SCALE_DIR:-/var/tmp/scale-run}/$TAG
rm -rf $D; mkdir -p $D
T() { local name=$1; shift; echo "== $name (load: $(cut -d' ' -f1-3 /proc/loadavg))"; /usr/bin/time -v "$@" > $D/$name.out 2> $D/$name.time; grep -v wrote $D/$name.out | tail -25; grep -E "Elapsed|Maximum resident|User time|System time|File system" $D/$name.time; }
T synth $B synth prs --n $N --seed 1 --out $D/in
du -sb $D/in/prs
T recon-p8 $B reconstruct --in $D/in/prs --out $D/p8 --dedup-partitions 8
du -sb $D/p8/samples $D/p8/dedup
T pack $B pack --in $D/p8/samples --out $D/packed --tokenizer ${TOKENIZER:-../shared/data/tokenizers/qwen2.5/tokenizer.json}
du -sb $D/packed
if [ "${ONE:-1}" = 1 ]; then
T recon-one $B reconstruct --in $D/in/prs --out $D/one
diff -r $D/one/samples $D/p8/samples > /dev/null && echo "SAMPLES IDENTICAL (one-process vs P=8)" || echo "SAMPLES DIFFER"
fi
