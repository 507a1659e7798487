#!/usr/bin/env bash
# Reproduces the rows of docs/RELIABILITY.md: prints each command and what it printed (the last
# lines) with its exit status. Runs in a new temporary folder; needs the Omniglot archives:
#   KSHOT_DATA_DIR=$(cd ../shared/data && pwd) KSHOT_CACHE_DIR=~/.cache/kshot bash benchmarks/reliability_matrix.sh
# (a few minutes; the two cache rows at the top decode Omniglot twice into fresh caches).
set -u
export KSHOT_DATA_DIR=$(cd "${KSHOT_DATA_DIR:?set KSHOT_DATA_DIR to the folder holding omniglot/}" && pwd)
export KSHOT_CACHE_DIR=${KSHOT_CACHE_DIR:?set KSHOT_CACHE_DIR to a cache that may hold Omniglot already}
cd "$(mktemp -d)"
run() { echo "\$ $*"; bash -c "$*" 2>&1 | grep -v "^\s*$" | tail -n ${TAILN:-4}; echo "[exit ${PIPESTATUS[0]}]"; echo; }
Q="--threads 1 --quiet"
TINY="--steps 4 --val-every 0 --test-tasks 0 --backbone-options '{\"hidden\": 8}' $Q"

echo "## caches"
run "export KSHOT_CACHE_DIR=\$PWD/killed; python -c 'import kshot; kshot.load_dataset(\"omniglot\", \"train\")' & P=\$!; sleep 8; W=\$(pgrep -P \$P | tr '\\n' ,); kill -9 \$P; sleep 1; echo \"decoder workers \${W%,} of the killed build still running: \$(ps -o stat= -p \${W%,} | grep -vc Z)\"; kshot train --preset quick --steps 2 --val-every 0 --test-tasks 0 --run-dir killed-run $Q; ls killed/omniglot"
run "export KSHOT_CACHE_DIR=\$PWD/shared-cache; python -c 'import kshot; kshot.load_dataset(\"omniglot\", \"train\")' & sleep 4; kshot train --preset quick --steps 2 --val-every 0 --test-tasks 0 --run-dir waiting-run $Q; wait"
echo "## faults"
run "kshot train --preset quick --steps 4 --val-every 2 --val-tasks 10 --test-tasks 0 --run-dir run $Q"
run "kshot train --preset quick --algo maml --inner-lr 1e30 --run-dir diverged $Q; ls diverged"
python - <<'PY'
import torch
from kshot.services.checkpoint import load_checkpoint, save_checkpoint
from kshot.runs.build import learner_from_checkpoint
c = load_checkpoint("run/best.safetensors")
l = learner_from_checkpoint(c)
with torch.no_grad():
    next(l.parameters()).fill_(float("nan"))
save_checkpoint("nan.safetensors", l, config=c.config, extra=c.extra)
PY
run "kshot eval nan.safetensors"
mkdir -p sup/a sup/b q && python -c "
import zipfile; z = zipfile.ZipFile('$KSHOT_DATA_DIR/omniglot/images_evaluation.zip')
names = sorted(n for n in z.namelist() if n.startswith('images_evaluation/Tengwar/character0') and n.endswith('.png'))
for i, n in enumerate(names[:40]):
    open(('sup/a/' if i < 5 else 'sup/b/' if 20 <= i < 25 else 'q/') + n.rsplit('/', 1)[1], 'wb').write(z.read(n))"
run "kshot adapt nan.safetensors --support sup --query q"
TAG=$(python -c "from kshot.services.files import host_tag; print(host_tag())")
run "touch run/.last.safetensors.$TAG-999999.abcd1234.tmp run/.last.safetensors.$TAG-$$.efgh5678.tmp; kshot train --preset quick --steps 6 --val-every 2 --val-tasks 10 --test-tasks 0 --run-dir run $Q; ls -a run | grep tmp"
run "touch afile; kshot train --preset quick --run-dir afile/run $Q"
run "kshot train --preset quick --lr-schedule cosine $TINY --run-dir cosine && kshot train --preset quick --lr-schedule cosine $TINY --steps 8 --run-dir cosine"
echo "## archives and downloads"
python - <<'PY'
import os, zipfile
src = os.environ["KSHOT_DATA_DIR"] + "/omniglot"
os.makedirs("bomb/omniglot")
os.symlink(src + "/images_evaluation.zip", "bomb/omniglot/images_evaluation.zip")
with zipfile.ZipFile(src + "/images_background.zip") as z, zipfile.ZipFile("bomb/omniglot/images_background.zip", "w") as out:
    first = min(n for n in z.namelist() if n.endswith(".png"))
    for info in z.infolist():
        if info.filename != first:
            out.writestr(info.filename, z.read(info)); continue
        zi = zipfile.ZipInfo(first); zi.compress_type = zipfile.ZIP_DEFLATED
        with out.open(zi, "w", force_zip64=True) as m:
            for _ in range(1024): m.write(bytes(1 << 20))
PY
run "ls -l bomb/omniglot/images_background.zip | cut -d' ' -f5; kshot train --preset quick --data-dir bomb --cache-dir fresh-cache $Q; ls fresh-cache 2>&1"
run "env -u KSHOT_DATA_DIR -u KSHOT_CACHE_DIR XDG_CACHE_HOME=\$PWD/home kshot train --preset quick $Q; ls home 2>&1"
echo "## checkpoints"
python - <<'PY'
import json, shutil
from safetensors import safe_open
from safetensors.torch import save_file
def edit(name, **fields):
    with safe_open("run/best.safetensors", framework="pt") as f:
        header, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    for k, v in fields.items():
        header[k] = json.dumps(v(json.loads(header[k])) if callable(v) else v)
    save_file(tensors, name, metadata=header)
def hidden(l): l["model"]["kwargs"]["hidden"] = 6000; return l
def hot(l): l["options"]["temperature"] = "hot"; return l
edit("hidden.safetensors", learner=hidden)
edit("size.safetensors", extra=lambda e: {**e, "image_format": {**e["image_format"], "size": 100000}})
edit("hot.safetensors", learner=hot)
edit("list.safetensors", config=["a", "list"])
edit("shape.safetensors", extra=lambda e: {**e, "example_shape": 5})
edit("step.safetensors", train_state={"step": "abc"})
edit("paths.safetensors", config=lambda c: {**c, "cache_dir": "elsewhere/cache", "data_dir": "elsewhere/data"})
with safe_open("run/last.safetensors", framework="pt") as f:
    header, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys() if not k.startswith("optim.")}
om = json.loads(header["optimizer"]); del om["slots"]; header["optimizer"] = json.dumps(om)
save_file(tensors, "noslots.safetensors", metadata=header)
PY
run "env time -f 'peak %M KiB' kshot eval hidden.safetensors"
run "kshot adapt size.safetensors --support sup --query q"
for f in hot list shape step noslots; do run "kshot eval $f.safetensors"; done
run "kshot eval paths.safetensors --tasks 600 $Q; ls elsewhere 2>&1"
echo "## config files"
python - <<'PY'
lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
for i, n in enumerate("bcdefghi"):
    lines.append(f"{n}: &{n} [" + ",".join([f"*{'abcdefghi'[i]}"] * 9) + "]")
lines.append("extra: {x: *i}")
open("bomb.yaml", "w").write("\n".join(lines) + "\n")
open("latin1.toml", "wb").write("ways = 5\n# caf\xe9\n".encode("latin-1"))
for name, text in {"bool.yaml": "ways: true\n", "typo.yaml": "test_within_groups: flase\n",
                   "seed.yaml": "seed: %d\n" % 2**70, "extra.yaml": "extra: {cache_dir: /elsewhere}\n"}.items():
    open(name, "w").write(text)
PY
run "wc -c < bomb.yaml; kshot train --preset quick --config bomb.yaml"
for f in bool.yaml typo.yaml seed.yaml extra.yaml latin1.toml; do run "kshot train --preset quick --config $f"; done
run "kshot train --preset quick --lr nan"
echo "## options and devices"
run "kshot train --preset quick --device gpu"
run "kshot eval run --device gpu"
run "kshot adapt run --support sup --query q --device gpu"
run "touch afile; kshot eval run --out afile/result.json"
run "kshot eval run --queries 0"
run "kshot train --preset quick --similarity kotch"
run "kshot train --preset quick --algo maml --distance euclid"
run "kshot train --preset quick --ways 1 --test-ways 1"
echo "## tables"
python - <<'PY'
import random
random.seed(0)
rows = [f"{c},{random.random():.6f},{random.random():.6f}" for c in ("none", "writer", "doctor", "artist", "lawyer", "nurse", "cook", "pilot", "clerk", "guard") for _ in range(8)]
open("jobs.csv", "w").write("occupation,age,hours\n" + "\n".join(rows) + "\n")
open("dups.csv", "w").write("occupation,age,hours\n" + "\n".join(rows + rows[:5]) + "\n")
open("bad.csv", "w").write("occupation,age,hours\n" + "\n".join(rows) + "\nextra,1,oops\n")
PY
T="--dataset table --backbone mlp --extra '{\"label_column\": \"occupation\"}' --ways 2 --queries 1 --test-queries 1 --steps 4 --val-every 0 --test-tasks 0 $Q"
run "kshot train $T --data-path jobs.csv --run-dir jobs"
run "kshot train $T --data-path bad.csv --run-dir bad; ls bad 2>&1; sed -i '\$d' bad.csv; kshot train $T --data-path bad.csv --run-dir bad"
run "kshot train $T --data-path dups.csv --run-dir dups"
run "kshot train --dataset table --backbone mlp --extra '{\"label_column\": \"occupation\", \"feature_columns\": [\"age\", \"salary\"]}' --data-path jobs.csv --run-dir feat $Q"
run "kshot train $T --backbone conv4 --data-path jobs.csv --run-dir conv"
echo "## adapt"
mkdir -p q-light && python -c "
from pathlib import Path; from PIL import Image, ImageOps
for p in Path('q').glob('*.png'): ImageOps.invert(Image.open(p).convert('L')).save('q-light/' + p.name)"
TAILN=3 run "kshot adapt run --support sup --query q --out p.csv"
TAILN=3 run "kshot adapt run --support sup --query q-light --out p-light.csv; cmp <(cut -d, -f2 p.csv) <(cut -d, -f2 p-light.csv) && echo same predictions"
run "kshot adapt run --support sup --query q/\$(ls q | head -1) --out -"
run "cp sup/a/\$(ls sup/a | head -1) q/copy.png; kshot adapt run --support sup --query q --out p.csv; rm q/copy.png"
echo "## your own data, elsewhere"
mkdir -p proj/mine && python -c "
import os, zipfile; z = zipfile.ZipFile('$KSHOT_DATA_DIR/omniglot/images_evaluation.zip')
for n in sorted(n for n in z.namelist() if n.startswith('images_evaluation/Angelic/') and n.endswith('.png')):
    a, c, f = n.split('/')[1:]
    if int(f.split('_')[1][:2]) <= 4:
        os.makedirs(f'proj/mine/{c}', exist_ok=True); open(f'proj/mine/{c}/{f}', 'wb').write(z.read(n))"
run "cd proj && kshot train --dataset folder --data-path mine --extra '{\"invert\": true}' --ways 3 --queries 1 --test-queries 1 --run-dir run $TINY"
run "kshot eval proj/run --queries 1 --tasks 600 $Q"
run "mv proj moved; kshot eval moved/run --queries 1 --tasks 600 $Q"
run "kshot eval moved/run --data-path moved/mine --queries 1 --tasks 600 $Q"
