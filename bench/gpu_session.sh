#!/usr/bin/env bash
# One prepared run for a lent GPU machine (a single H100 here): what the 2-core CPU cannot do in a
# session, in order of worth, each part inside a wall-clock budget so the whole ends in time.
#
#   tune: the benchmark world's tune sweep (`cns bench world --sweep tune`, the gate's all-K/V
#      family first), as SHARDS processes side by side on the one GPU: the 1.7 M-parameter world
#      model leaves a GPU mostly idle, so one process per cell is the way to fill it. It starts
#      from the committed cache (docs/world/tune-cache), so only missing cells run; runs that
#      finish are cached; gate.json and tuned.json are written when their cells are all in.
#   sd15: SD-1.5 step timings, bench/train_bench.py on SD-1.5's UNet at 512 px (64x64 latents).
#   wide: pretrain a WIDE-wide world (default 128 K/V rows a layer, `cns world pretrain --width`) for
#      WIDE_MIN minutes at the GPU's batch (WIDE_BATCH 256, WIDE_STEPS 3000: 768 k scenes, twice the
#      CPU run's), in its own folder data/world/pretrain-WIDE-gpu; runs first when asked for. At 64
#      wide CNS needed half a layer's rows (docs/world/cns-probe-2026-11-27); a wider world tests it
#      at SD-like budgets. The checkpoint (77 MB at 128: weights, EMA, Adam's moments) cannot come
#      back (16 MiB a file, 64 MiB in all) nor travel (64 MiB with the tree), so the CPU's own run
#      (data/world/pretrain-128, committed at the end of each session that trains it) is not resumed here: move that folder out of the working
#      tree before the device call, or the tree does not fit what a call carries. Result:
#      the exported model (EMA weights; mid-run if not finished) as model-WIDE.tar.part-* of 15 MB:
#      `cat model-WIDE.tar.part-* | tar -xf -` at the repository root gives data/world/model-WIDE.
#
# Usage (repository root; the device tool sets OUT; .whl holds the wheels the machine lacks:
# diffusers, `pip download --no-deps diffusers==<.venv's version>` for Python 3.12):
#   BUDGET=540 SHARDS=12 PARTS="tune sd15" bash bench/gpu_session.sh
#   BUDGET=540 PARTS="wide" WIDE=128 WIDE_MIN=7 bash bench/gpu_session.sh
# (wide alone: its model parts take most of what may come back, 52 MB at 128 wide; dry-run on CPU with
# DEVICE=cpu WIDE_STEPS=3 WIDE_BATCH=2 WIDE_MIN=1 and the venv's python3 first on PATH: 23 s, 4 parts)
# Results under $OUT: world-tune.tar.gz (the sweep's whole cache: run records and sample strips;
# unpack it over docs/world/tune-cache), gate.json / tuned.json when complete,
# train_sd15.{md,json}, session.log. Run on 2026-11-27 (one H100): docs/benchmarks.md, docs/world.md.
set -u
BUDGET=${BUDGET:-540}
SHARDS=${SHARDS:-12}
PARTS=${PARTS:-"tune sd15"}
case " $PARTS " in *" sd15 "*) SD_RESERVE=${SD_RESERVE:-300} ;; *) SD_RESERVE=0 ;; esac
DEVICE=${DEVICE:-cuda}  # cpu: a dry run of this script on a machine without one
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[$(elapsed)s] $*" | tee -a "$OUT/session.log"; }

export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { log "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
  'transformers', transformers.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/session.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$OUT/session.log" 2>&1

# ---- a wider world's pretraining (first: it is what the CPU cannot do at all) ---------------------
if [[ " $PARTS " == *" wide "* ]]; then
WIDE=${WIDE:-128}
WIDE_MIN=${WIDE_MIN:-6}
WIDE_BATCH=${WIDE_BATCH:-256}
WIDE_STEPS=${WIDE_STEPS:-3000}
log "pretraining a ${WIDE}-wide world for ${WIDE_MIN} min, batch $WIDE_BATCH, $WIDE_STEPS steps (data/world/pretrain-$WIDE-gpu)"
# the width's own settings where it has a file (params-128.yaml: Adam 5e-4, three-object scenes)
WIDE_PARAMS=data/world/params-$WIDE.yaml; [ -f "$WIDE_PARAMS" ] || WIDE_PARAMS=data/world/params.yaml
timeout --signal=TERM $(( ${WIDE_MIN%.*} * 60 + 120 )) python3 -m flows.cli world pretrain --params "$WIDE_PARAMS" --width "$WIDE" \
  --batch-size "$WIDE_BATCH" --steps "$WIDE_STEPS" --checkpoint "data/world/pretrain-$WIDE-gpu" \
  --out "data/world/model-$WIDE" --budget-minutes "$WIDE_MIN" --checkpoint-minutes 2 --device "$DEVICE" --no-eval -q \
  >>"$OUT/session.log" 2>&1 || log "pretraining stopped with an error"
[ -d "data/world/model-$WIDE" ] || python3 -m flows.cli world export --checkpoint "data/world/pretrain-$WIDE-gpu" \
  --out "data/world/model-$WIDE" --device "$DEVICE" --no-eval >>"$OUT/session.log" 2>&1 || log "export failed"
cp "data/world/pretrain-$WIDE-gpu/state.json" "$OUT/pretrain-$WIDE-state.json" 2>/dev/null
tar -cf - "data/world/model-$WIDE" 2>>"$OUT/session.log" | split -b 15M - "$OUT/model-$WIDE.tar.part-"
log "wide part done: $(ls "$OUT" | grep -c "model-$WIDE.tar.part-") parts"
fi

# ---- the tune sweep, sharded -------------------------------------------------------------------
if [[ " $PARTS " == *" tune "* ]]; then
CACHE=/tmp/world-tune
WORLD_OUT=/tmp/world-out
mkdir -p "$CACHE" "$WORLD_OUT"
[ -d docs/world/tune-cache ] && cp -n docs/world/tune-cache/* "$CACHE"/
SWEEP_END=$(( BUDGET - SD_RESERVE - 40 ))
log "tune sweep: $SHARDS shards until ${SWEEP_END}s"
for k in $(seq 0 $((SHARDS - 1))); do
  timeout --signal=KILL $(( SWEEP_END - $(elapsed) )) python3 -m flows.cli bench world --sweep tune --device "$DEVICE" \
    --out "$WORLD_OUT" --cache "$CACHE" --shard "$k/$SHARDS" -q >"/tmp/shard$k.log" 2>&1 &
done
wait
kv=$(ls "$CACHE"/kv-*.json 2>/dev/null | wc -l); all=$(ls "$CACHE"/*-steps*.json 2>/dev/null | wc -l)
log "tune sweep stopped: $kv kv runs, $all runs in all"
for k in 0 1; do tail -n 5 "/tmp/shard$k.log" >>"$OUT/session.log"; done
grep -l Traceback /tmp/shard*.log >/dev/null 2>&1 && { log "a shard failed:"; grep -h -A30 Traceback /tmp/shard*.log | tail -n 40 >>"$OUT/session.log"; }
# The records, only from complete caches (an assembling run would compute what is missing).
read -r kv_cells all_cells < <(python3 -c "from world.bench import TUNE_GRID as g; from world.sweeps import FAMILY_METHOD as f
n = len(g['token_learning_rate']) * len(g['steps']); print(len(g['learning_rate']) * n, (len(f) - 1) * len(g['learning_rate']) * n + n)")
if [ "$kv" -ge "${kv_cells:-1000}" ]; then
  timeout 30 python3 -m flows.cli bench world --sweep gate --device "$DEVICE" --out "$WORLD_OUT" --cache "$CACHE" -q \
    >>"$OUT/session.log" 2>&1 && cp "$WORLD_OUT/gate.json" "$OUT/"
fi
if [ "$all" -ge "${all_cells:-1000}" ]; then
  timeout 30 python3 -m flows.cli bench world --sweep tune --device "$DEVICE" --out "$WORLD_OUT" --cache "$CACHE" -q \
    >>"$OUT/session.log" 2>&1 && cp "$WORLD_OUT/tuned.json" "$OUT/"
fi
tar -czf "$OUT/world-tune.tar.gz" -C "$CACHE" --exclude='.work*' --exclude='*.tmp' . 2>>"$OUT/session.log"
log "world part done"
fi

# ---- SD-1.5 step timings -----------------------------------------------------------------------
[[ " $PARTS " == *" sd15 "* ]] || { log "end"; exit 0; }
left=$(( BUDGET - $(elapsed) - 5 ))
log "SD-1.5 timings, ${left}s"
timeout --signal=KILL "$left" python3 bench/train_bench.py --models sd15 --latent-size 64 --device "$DEVICE" \
  --steps 10 --warmup 3 --rounds 3 --turn-steps 5 --json "$OUT/train_sd15.json" >"$OUT/train_sd15.md" 2>>"$OUT/session.log"
log "SD-1.5 timings: exit $?"
log "end"
