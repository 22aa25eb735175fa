"""The GPU check of issue 20: reversible backprop against plain backprop on a JAX + CUDA machine.

One command, run from the repository root on a machine with JAX (CUDA) and no TensorFlow, after
`benchmarks/gpu/prepare.sh` has filled `benchmarks/gpu/wheelhouse/` here and the working tree (with that
folder) has been carried there:

    python benchmarks/gpu/run.py --output gpu_check.json          # at most --total-s (450 s) in all
    python benchmarks/gpu/run.py --quick --output /tmp/quick.json  # CPU JAX, tiny sizes, under a minute

It installs the wheelhouse if `keras` or `tf_revnet` is not importable (`pip install --no-index
--find-links`), then measures, each configuration in its own process (JAX keeps one peak per process):

- `per_block`: a `ReversibleSequence` holding one `ReversibleBlockStack` of N identical basic blocks
  (64-channel halves, batch 32, 32x32), reversible against plain backprop (`use_custom_gradient=False`)
  at N = 4 and 16: the per-step peak per added block.
- `revnet110`: `tf_revnet.models.RevNet110` at batch 128, one jitted SGD step: per-step peak and median
  step time, reversible (stacked blocks) against plain (one layer per block, ordinary autodiff).
- `cifar10`: RevNet-38 against ResNet-32 on CIFAR-10 (JPEG copy) with the paper's recipe (the `cifar`
  recipe of `training/recipes.py`: SGD momentum 0.9, lr 0.1 divided by 10 at 50% and 75% of the steps,
  L2 weight decay 2e-4, batch 100, pad-4 crop and flip) compressed to the epochs that fit: RevNet-38
  trains first in its share of the time left and fixes the number of epochs after its first one;
  ResNet-32 then trains for as many epochs, on the same schedule. Test accuracy after every epoch.

Meter: `jax.devices()[0].memory_stats()["peak_bytes_in_use"]` (JAX's allocator; there is no reset, so
each process measures one configuration: peak minus `bytes_in_use` before the first step). Where
`memory_stats()` is None (CPU), the per-step peak RSS instead (`/proc/self/status` VmHWM after a reset,
minus VmRSS before the step); the JSON's `meter` says which. Every run also records XLA's own plan of the
compiled step (`compiled.memory_analysis().temp_size_in_bytes`).
"""

import argparse
import concurrent.futures
import datetime
import io
import json
import math
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
WHEELHOUSE = HERE / "wheelhouse"
ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MIB = 2.0**20

sys.path.insert(0, str(HERE.parent))
from measure import CpuMeter  # noqa: E402  (benchmarks/measure.py, standard library only)

# Sizes of the full check and of --quick (CPU JAX, in the test suite).
FULL = dict(block_depths=(4, 16), block_channels=64, block_batch=32, block_image=32,
            model="revnet110", model_batch=128, model_steps=20,
            cifar_models=("revnet38", "resnet32"), train_per_class=None, eval_batch=500)
QUICK = dict(block_depths=(2, 3), block_channels=8, block_batch=32, block_image=32,
             model="tiny_revnet", model_batch=4, model_steps=3,
             cifar_models=("tiny_revnet", "tiny_resnet"), train_per_class=7, eval_batch=16)


# === Parent: install, data, the three sections, the JSON ===

def ensure_installed(wheelhouse=WHEELHOUSE):
    """Installs keras (and its missing small dependencies) and tf_revnet from `wheelhouse` when either is
    not importable. Returns a dict saying what was done."""
    import importlib.util

    missing = [m for m in ("keras", "tf_revnet") if importlib.util.find_spec(m) is None]
    if not missing:
        return {"installed": False, "reason": "keras and tf_revnet importable"}
    wheels = sorted(wheelhouse.glob("tf_revnet-*.whl"))
    if not wheels:
        raise SystemExit(f"{', '.join(missing)} not importable and no wheelhouse at {wheelhouse}: run "
                         "benchmarks/gpu/prepare.sh where pip reaches PyPI and carry that folder.")
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse), "-q"]
    t0 = time.perf_counter()
    # keras through the resolver (what the machine has is kept); tf_revnet without its install_requires
    # (TensorFlow, tensorflow-datasets: the library itself runs on JAX without them).
    subprocess.run(pip + ["keras"], check=True)
    subprocess.run(pip + ["--no-deps", str(wheels[-1])], check=True)
    import importlib

    importlib.invalidate_caches()
    return {"installed": True, "wheels": [p.name for p in sorted(wheelhouse.glob("*.whl"))],
            "install_s": round(time.perf_counter() - t0, 1)}


def find_archive(explicit):
    """The CIFAR-10 JPEG archive: `--data`, the wheelhouse's copy, $TF_REVNET_CIFAR10_ARCHIVE or
    ../shared/data/ beside the repository (the development machines); None if none exists."""
    candidates = [explicit] if explicit else [
        WHEELHOUSE / ARCHIVE_NAME, os.environ.get("TF_REVNET_CIFAR10_ARCHIVE"),
        REPO_ROOT.parent / "shared" / "data" / ARCHIVE_NAME]
    for candidate in candidates:
        if candidate and pathlib.Path(candidate).is_file():
            return pathlib.Path(candidate)
    if explicit:
        raise SystemExit(f"--data {explicit}: no such file")
    return None


def decode_cifar(archive, per_class=None):
    """`{"x_train", "y_train", "x_test", "y_test"}` (uint8 NHWC, int32 labels) from the JPEG archive
    (`train/<class>/*.jpg`, `test/<class>/*.jpg`), decoded with Pillow; `per_class`: the first N of each
    split's class folder."""
    import numpy as np
    from PIL import Image

    images = {"train": [], "test": []}
    labels = {"train": [], "test": []}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or parts[-3] not in images or parts[-2] not in CLASSES:
                continue
            split, label = parts[-3], CLASSES.index(parts[-2])
            if per_class is not None:
                if labels[split].count(label) >= per_class:
                    if all(len(v) >= per_class * len(CLASSES) for v in labels.values()):
                        break
                    continue
            with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                images[split].append(np.asarray(image.convert("RGB"), dtype=np.uint8))
            labels[split].append(label)
    return {f"x_{s}": np.stack(images[s]) for s in images} | {
        f"y_{s}": np.asarray(labels[s], np.int32) for s in labels}


def synthetic_cifar(per_class):
    """Random images with random labels (--quick where no archive exists); says nothing about accuracy."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = per_class * len(CLASSES)
    return {"x_train": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            "y_train": rng.integers(0, 10, n).astype(np.int32),
            "x_test": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            "y_test": rng.integers(0, 10, n).astype(np.int32)}


def prepare_cifar(args, sizes, tmp):
    """Decodes the archive (or makes synthetic images, --quick only) into `tmp/cifar10.npz`, which the
    training children load. Returns `(path, description, seconds)`."""
    import numpy as np

    archive = find_archive(args.data)
    t0 = time.perf_counter()
    if archive is not None:
        data = decode_cifar(archive, sizes["train_per_class"])
        source = f"CIFAR-10 (JPEG copy) {archive.name}"
    elif args.quick:
        data, source = synthetic_cifar(sizes["train_per_class"]), "synthetic (no archive found)"
    else:
        raise SystemExit(f"no {ARCHIVE_NAME}: pass --data or run benchmarks/gpu/prepare.sh here")
    np.savez(tmp / "cifar10.npz", **data)
    source += f", {len(data['y_train'])} train / {len(data['y_test'])} test images"
    return tmp / "cifar10.npz", source, time.perf_counter() - t0


def child_env(args):
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2",
               # Several children share the GPU in `per_block`; JAX's allocator statistics do not
               # depend on preallocation, which would give each process 75% of the card.
               XLA_PYTHON_CLIENT_PREALLOCATE="false",
               # One compilation cache for all children: Keras on JAX compiles each initializer for each
               # weight shape (most of a small child's time on CPU); no measured step is compiled twice.
               JAX_COMPILATION_CACHE_DIR=str(args.cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if args.quick:
        env["JAX_PLATFORMS"] = "cpu"
    return env


def run_children(configs, args, deadline, timeout, jobs=1):
    """Runs the configs in child processes (`--child`), each in its own, `jobs` at a time, none past
    `deadline`. With --quick, all of them in one child: the CPU meter (peak RSS after a reset) is one
    step's, so configurations in one process do not mix; JAX's device peak is the process' (no reset)."""
    groups = [configs] if args.quick else [[c] for c in configs]

    def one(group):
        left = deadline - time.monotonic()
        if left < 10:
            return [{**c, "error": "skipped: the command's time (--total-s) is spent"} for c in group]
        command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", json.dumps(group)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(command, env=child_env(args), capture_output=True, text=True,
                                  timeout=min(timeout * len(group), left))
        except subprocess.TimeoutExpired:
            return [{**c, "error": f"timeout after {min(timeout * len(group), left):.0f} s"} for c in group]
        results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
                   if line.startswith("RESULT ")]
        for r in results:
            r["wall_s"] = (time.perf_counter() - t0) / len(group)
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        missing = group[len(results):]
        return results + [{**c, "error": tail or f"exit status {proc.returncode}"} for c in missing]

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        return [r for results in pool.map(one, groups) for r in results]


def per_block_section(args, sizes, deadline):
    configs = [dict(kind="blocks", method=method, depth=depth, channels=sizes["block_channels"],
                    batch=sizes["block_batch"], image=sizes["block_image"])
               for method in ("reversible", "plain") for depth in sizes["block_depths"]]
    # Memory only (times are not reported here): the children may share the device.
    runs = run_children(configs, args, deadline, timeout=240, jobs=args.jobs)
    section = {"what": "ReversibleSequence(ReversibleBlockStack(basic block, N)), one jitted SGD step",
               "runs": runs}
    lo, hi = sizes["block_depths"]
    for method in ("reversible", "plain"):
        peaks = {r["depth"]: r.get("step_peak_mb") for r in runs if r["method"] == method}
        temps = {r["depth"]: r.get("xla_temp_mb") for r in runs if r["method"] == method}
        if None not in (peaks.get(lo), peaks.get(hi)):
            section[f"{method}_mb_per_block"] = (peaks[hi] - peaks[lo]) / (hi - lo)
        if None not in (temps.get(lo), temps.get(hi)):
            section[f"{method}_xla_temp_mb_per_block"] = (temps[hi] - temps[lo]) / (hi - lo)
    if section.get("plain_mb_per_block"):
        section["per_block_ratio"] = section.get("reversible_mb_per_block", math.nan) / section[
            "plain_mb_per_block"]
    return section


def model_section(args, sizes, deadline):
    configs = [dict(kind="model", model=sizes["model"], method=method, batch=sizes["model_batch"],
                    steps=sizes["model_steps"]) for method in ("reversible", "plain")]
    runs = run_children(configs, args, deadline, timeout=240)  # one at a time: step times are reported
    section = {"what": f"{sizes['model']} at batch {sizes['model_batch']}, one jitted SGD step", "runs": runs}
    rev, plain = runs
    for key in ("step_peak_mb", "step_s", "xla_temp_mb"):
        if rev.get(key) and plain.get(key):
            section[f"{key}_ratio"] = rev[key] / plain[key]
    return section


def cifar_section(args, sizes, deadline, data_file, data_source):
    from training import recipes  # the repository's recipe (standard library only)

    recipe = recipes.get("cifar")
    if args.batch_size:
        recipe = recipe.scaled_to_batch(args.batch_size)
    common = dict(kind="train", data=str(data_file), batch=recipe.batch_size if not args.quick else 16,
                  learning_rate=recipe.learning_rate, momentum=recipe.momentum,
                  weight_decay=recipe.weight_decay, decay_boundaries=list(recipe.decay_boundaries),
                  decay_factor=recipe.decay_factor, eval_batch=sizes["eval_batch"], seed=0)
    section = {"data": data_source, "recipe": recipe.to_dict(),
               "schedule": "the recipe's step decay at fractions of the steps of the epochs that fit"}
    first, second = sizes["cifar_models"]
    left = deadline - time.monotonic() - 15  # the JSON and the table
    if left < 30:
        return section | {"runs": [], "error": f"skipped: {left:.0f} s left of --total-s"}
    # RevNet-38's step costs about 1.3x ResNet-32's: its share of the time left leaves as many epochs of
    # ResNet-32 the rest.
    budget = args.budget_s or left * 0.56
    if args.quick:  # fixed epochs: both in one child
        section["runs"] = run_children([dict(common, model=m, budget_s=left, epochs=args.epochs)
                                        for m in (first, second)], args, deadline, timeout=left)
        return section
    (rev,) = run_children([dict(common, model=first, budget_s=budget, epochs=args.epochs)], args,
                          deadline, timeout=budget + 120)
    runs = [rev]
    epochs = rev.get("epochs_planned")
    if epochs:
        left = deadline - time.monotonic() - 15
        runs += run_children([dict(common, model=second, budget_s=left, epochs=epochs)], args, deadline,
                             timeout=left + 60)
    section["runs"] = runs
    return section


def machine(args, runs):
    info = next((r["machine"] for r in runs if "machine" in r), {})
    import importlib.util

    return info | {"python": platform.python_version(), "host": platform.node(),
                   "tensorflow_installed": importlib.util.find_spec("tensorflow") is not None}


def fmt(value, spec=".1f"):
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(
        value, spec)


def print_table(result):
    print(f"meter: {result['meter']}")
    block = result["per_block"]
    print("\nper block (MB per added block):  reversible {}  plain {}  ratio {}".format(
        fmt(block.get("reversible_mb_per_block"), ".2f"), fmt(block.get("plain_mb_per_block"), ".2f"),
        fmt(block.get("per_block_ratio"), ".3f")))
    for r in block["runs"]:
        print(f"  {r['method']:<10} N={r['depth']:<3} step peak {fmt(r.get('step_peak_mb'))} MB, "
              f"XLA temp {fmt(r.get('xla_temp_mb'))} MB {r.get('error', '')}")
    model = result["model"]
    print(f"\n{model['what']}:")
    for r in model["runs"]:
        print(f"  {r['method']:<10} step peak {fmt(r.get('step_peak_mb'))} MB, step "
              f"{fmt(r.get('step_s'), '.4f')} s, compile {fmt(r.get('compile_s'))} s {r.get('error', '')}")
    print(f"  ratios: peak {fmt(model.get('step_peak_mb_ratio'), '.3f')}, "
          f"step time {fmt(model.get('step_s_ratio'), '.3f')}")
    cifar = result["cifar10"]
    print(f"\nCIFAR-10 ({cifar['data']}): {cifar.get('error', '')}")
    for r in cifar.get("runs", []):
        accuracy = r.get("test_accuracy") or [None]
        print(f"  {r['model']:<12} epochs {r.get('epochs_done', 0)}/{r.get('epochs_planned', '-')}, "
              f"epoch {fmt(r.get('epoch_s'))} s, test accuracy {fmt(accuracy[-1], '.4f')} "
              f"{r.get('error', '')}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="gpu_check.json", help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on CPU JAX (the test suite)")
    parser.add_argument("--total-s", type=float, default=450.0,
                        help="the whole command's time; CIFAR-10 gets what the other sections leave")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="RevNet-38's training time (default: 56%% of what is left)")
    parser.add_argument("--epochs", type=int, default=None, help="fix the epochs instead of fitting them")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="training batch (the recipe's 100 by default; lr scaled linearly)")
    parser.add_argument("--data", default=None, help=f"the CIFAR-10 JPEG archive ({ARCHIVE_NAME})")
    parser.add_argument("--jobs", type=int, default=None, help="per-block children at a time")
    parser.add_argument("--sections", nargs="+", default=["per_block", "model", "cifar10"],
                        choices=["per_block", "model", "cifar10"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))

    start = time.monotonic()
    deadline = start + args.total_s
    sizes = QUICK if args.quick else FULL
    if args.quick and args.epochs is None:
        args.epochs = 1
    args.jobs = args.jobs or (2 if args.quick else 4)
    install = ensure_installed()
    sys.path.insert(0, str(REPO_ROOT))
    result = {"command": [sys.executable, *sys.argv] if argv is None else ["run.py", *argv],
              "quick": args.quick, "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "install": install, "total_s_limit": args.total_s}
    empty = {"runs": [], "error": "not run (--sections)"}
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="tf_revnet_gpu_"))
    args.cache_dir = tmp / "jax_cache"
    try:
        if "cifar10" in args.sections:  # first: a missing archive fails at once
            data_file, source, decode_s = prepare_cifar(args, sizes, tmp)
        result["per_block"] = (per_block_section(args, sizes, deadline) if "per_block" in args.sections
                               else dict(empty))
        result["model"] = model_section(args, sizes, deadline) if "model" in args.sections else dict(empty)
        if "cifar10" in args.sections:
            result["cifar10"] = cifar_section(args, sizes, deadline, data_file, source)
            result["cifar10"]["decode_s"] = decode_s
        else:
            result["cifar10"] = dict(empty, data="-")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    all_runs = result["per_block"]["runs"] + result["model"]["runs"] + result["cifar10"]["runs"]
    result["machine"] = machine(args, all_runs)
    result["meter"] = next((r["meter"] for r in all_runs if "meter" in r), "-")
    result["errors"] = [r for r in all_runs if "error" in r]
    result["wall_s"] = time.monotonic() - start
    pathlib.Path(args.output).write_text(json.dumps(result, indent=1, default=float) + "\n")
    print_table(result)
    print(f"\n{len(result['errors'])} errors; {result['wall_s']:.0f} s; wrote {args.output}")
    return 1 if result["errors"] else 0


# === Child: one configuration, one process ===

class _NoTensorFlow:
    """A meta path finder under which `import tensorflow` raises ModuleNotFoundError."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden, as on the GPU machine)", name=name)
        return None


def child_main(configs):
    """Measures each of `configs` in turn (one, except with --quick) and prints a `RESULT {json}` line
    for each."""
    # As on the GPU machine, which has no TensorFlow: where it is installed Keras would import it (seconds
    # a child) to serialize a config or seed a generator. (Not `sys.modules["tensorflow"] = None`: Keras
    # reads `"tensorflow" in sys.modules` as "TensorFlow is loaded".)
    sys.meta_path.insert(0, _NoTensorFlow())
    import gc

    import jax
    import keras
    import numpy as np

    import tf_revnet

    device = jax.devices()[0]
    info = {"machine": {"platform": device.platform, "device": device.device_kind,
                        "jax": jax.__version__, "keras": keras.__version__,
                        "tf_revnet": tf_revnet.__version__, "tf_revnet_from": str(pathlib.Path(
                            tf_revnet.__file__).parent)}}
    on_device = device.memory_stats() is not None
    info["meter"] = ("device.memory_stats()['peak_bytes_in_use'] minus bytes_in_use before the first step"
                     if on_device else
                     "CPU: memory_stats() is None; peak RSS of the second step above RSS before it")
    for config in configs:
        keras.utils.set_random_seed(config.get("seed", 0))
        build = {"blocks": build_blocks, "model": build_model, "train": build_model}[config["kind"]]
        model, x, y = build(config, keras, np)
        state = initial_state(model)
        if config["kind"] == "train":
            result = train(config, model, state, jax, np)
        else:
            gc.collect()
            result = measure_step(config, model, state, x, y, jax, np, on_device, device)
        print("RESULT " + json.dumps({**config, **info, **result}, default=float), flush=True)
        del model, state
    return 0


def build_blocks(config, keras, np):
    from tf_revnet.layers import (
        BasicResidualFunction,
        ReversibleBlock,
        ReversibleBlockStack,
        ReversibleSequence,
    )

    c = config["channels"]
    stack = ReversibleBlockStack(ReversibleBlock(BasicResidualFunction(c), BasicResidualFunction(c)),
                                 depth=config["depth"])
    sequence = ReversibleSequence([stack], use_custom_gradient=config["method"] == "reversible")
    shape = (config["batch"], config["image"], config["image"], 2 * c)
    sequence.build(shape)
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    return sequence, x, None


def build_model(config, keras, np):
    import tf_revnet

    reversible = config.get("method", "reversible") == "reversible"
    name = config["model"]
    options = dict(input_shape=(32, 32, 3), classes=10, classifier_activation=None)
    if config["kind"] == "train":  # raw pixels in, the paper's L2 weight decay on every kernel
        options |= dict(include_preprocessing=True,
                        kernel_regularizer=keras.regularizers.L2(config["weight_decay"] / 2.0))
    if name == "tiny_revnet":
        model = tf_revnet.models.RevNet(units=(1, 1, 1), widths=(8, 8, 16, 32), name="tiny_revnet",
                                        use_custom_gradient=reversible, stack_blocks=reversible, **options)
    elif name == "tiny_resnet":
        model = tf_revnet.models.ResNet(units=(1, 1, 1), widths=(8, 8, 16, 32), name="tiny_resnet", **options)
    elif name.startswith("resnet"):
        model = tf_revnet.models.get(name)(**options)
    else:  # plain: the ordinary network, one layer per block
        model = tf_revnet.models.get(name)(use_custom_gradient=reversible, stack_blocks=reversible, **options)
    if config["kind"] == "train":
        return model, None, None
    rng = np.random.default_rng(0)
    batch = config["batch"]
    x = rng.standard_normal((batch, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, batch).astype("int32")
    return model, x, y


def initial_state(model):
    trainable = [v.value for v in model.trainable_variables]
    return trainable, [v.value for v in model.non_trainable_variables], [0.0 * w for w in trainable]


def make_step(model, momentum=0.9, classify=True):
    """One SGD-with-momentum step (Keras' `SGD` update) of `model` through `stateless_call`:
    `step((trainable, non_trainable, velocity), x, y, lr) -> (state, (loss, correct))`."""
    import jax
    import jax.numpy as jnp

    def loss_fn(trainable, non_trainable, x, y):
        out, non_trainable, losses = model.stateless_call(trainable, non_trainable, x.astype("float32"),
                                                          training=True, return_losses=True)
        if classify:
            logp = jax.nn.log_softmax(out.astype("float32"))
            loss = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
            correct = jnp.sum(jnp.argmax(out, axis=-1) == y)
        else:  # a block stack: any scalar of the output
            loss, correct = jnp.mean(out**2), jnp.zeros((), "int32")
        return loss + sum(losses, 0.0), (non_trainable, correct)

    def step(state, x, y, lr):
        trainable, non_trainable, velocity = state
        (loss, (non_trainable, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, non_trainable, x, y)
        velocity = [momentum * v - lr * g for v, g in zip(velocity, grads)]
        trainable = [w + v for w, v in zip(trainable, velocity)]
        return (trainable, non_trainable, velocity), (loss, correct)

    return step


def measure_step(config, model, state, x, y, jax, np, on_device, device):
    step = make_step(model, classify=y is not None)
    if y is None:
        y = np.zeros((x.shape[0],), "int32")
    x, y, lr = jax.device_put(x), jax.device_put(y), np.float32(0.01)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, x, y, lr).compile()
    compile_s = time.perf_counter() - t0
    analysis = compiled.memory_analysis()
    result = {"compile_s": compile_s, "params": int(sum(np.prod(w.shape) for w in state[0]))}
    if analysis is not None:
        result["xla_temp_mb"] = analysis.temp_size_in_bytes / MIB
        result["xla_argument_mb"] = analysis.argument_size_in_bytes / MIB
    stats = device.memory_stats() if on_device else None
    if stats:
        before = stats["bytes_in_use"]
        result["compile_peak_mb"] = (stats["peak_bytes_in_use"] - before) / MIB
    state, (loss, _) = compiled(state, x, y, lr)  # the first step (on a GPU: the measured one)
    jax.block_until_ready(loss)
    if stats:
        result["step_peak_mb"] = (device.memory_stats()["peak_bytes_in_use"] - before) / MIB
        result["resident_mb"] = before / MIB
    meter = CpuMeter()
    meter.start()
    state, (loss, _) = compiled(state, x, y, lr)
    jax.block_until_ready(loss)
    rss_peak, _ = meter.stop()
    result["rss_step_peak_mb"] = rss_peak / MIB
    if not stats:
        result["step_peak_mb"] = result["rss_step_peak_mb"]
    times = []
    for _ in range(config.get("steps", 0)):
        t0 = time.perf_counter()
        state, (loss, _) = compiled(state, x, y, lr)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    if times:
        result["step_s"] = statistics.median(times)
        result["step_times_s"] = times
    result["loss"] = float(loss)
    return result


def augment(padded, index, rng, np, size=32):
    """The paper's CIFAR augmentation on a batch: a random crop of the 4-pixel zero-padded images, and a
    random horizontal flip."""
    n = len(index)
    pad = (padded.shape[1] - size) // 2
    oy, ox = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
    rows = oy[:, None] + np.arange(size)
    cols = ox[:, None] + np.arange(size)
    flip = rng.random(n) < 0.5
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[index[:, None, None], rows[:, :, None], cols[:, None, :]]


def train(config, model, state, jax, np):
    """Trains for `epochs` (or as many as fit in `budget_s`, fixed after the first epoch) with the
    recipe's step decay over those epochs; the test accuracy after each epoch."""
    import jax.numpy as jnp

    t_start = time.perf_counter()
    data = np.load(config["data"])
    x_train, y_train, x_test, y_test = (data[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    batch, eval_batch = config["batch"], config["eval_batch"]
    padded = np.pad(x_train, ((0, 0), (4, 4), (4, 4), (0, 0)))
    steps_per_epoch = len(x_train) // batch
    step = jax.jit(make_step(model, config["momentum"]), donate_argnums=0)

    @jax.jit
    def predict(trainable, non_trainable, x):
        out, _ = model.stateless_call(trainable, non_trainable, x.astype("float32"), training=False)
        return jnp.argmax(out, axis=-1)

    def evaluate(state):
        n = len(x_test) // eval_batch * eval_batch
        hits = [jnp.sum(predict(state[0], state[1], x_test[i:i + eval_batch]) == y_test[i:i + eval_batch])
                for i in range(0, n, eval_batch)]
        return float(sum(int(h) for h in hits)) / n

    rng = np.random.default_rng(config["seed"])
    epochs = config.get("epochs")
    total_steps = epochs * steps_per_epoch if epochs else None
    result = {"params": int(sum(np.prod(w.shape) for w in state[0])), "steps_per_epoch": steps_per_epoch,
              "test_accuracy": [], "train_loss": [], "train_accuracy": [], "epoch_times_s": [],
              "learning_rates": []}
    global_step, epoch = 0, 0
    while epochs is None or epoch < epochs:
        t0 = time.perf_counter()
        order = rng.permutation(len(x_train))
        losses, correct, lrs = [], [], set()
        for i in range(steps_per_epoch):
            index = order[i * batch:(i + 1) * batch]
            lr = config["learning_rate"]
            if total_steps:
                lr *= config["decay_factor"] ** sum(
                    global_step >= max(1, round(b * total_steps)) for b in config["decay_boundaries"])
            lrs.add(lr)
            xb = augment(padded, index, rng, np)  # uint8: cast on the device
            state, (loss, hits) = step(state, xb, y_train[index], np.float32(lr))
            losses.append(loss)
            correct.append(hits)
            global_step += 1
            if epoch == 0 and i == 0:
                jax.block_until_ready(loss)
                result["first_step_s"] = time.perf_counter() - t0
                t_steady = time.perf_counter()
        jax.block_until_ready(state)
        train_s = time.perf_counter() - t0
        t_eval = time.perf_counter()
        result["test_accuracy"].append(evaluate(state))
        eval_s = time.perf_counter() - t_eval
        result["train_loss"].append(float(np.mean([float(v) for v in losses])))
        result["train_accuracy"].append(float(sum(int(c) for c in correct)) / (steps_per_epoch * batch))
        result["epoch_times_s"].append(train_s)
        result["learning_rates"].append(sorted(lrs, reverse=True))
        epoch += 1
        elapsed = time.perf_counter() - t_start
        if epoch == 1:
            # A steady epoch: the steps after the first (which compiled), scaled to the whole epoch.
            steady = (time.perf_counter() - eval_s - t_steady) * steps_per_epoch / max(1, steps_per_epoch - 1)
            result["epoch_s"] = steady
            result["eval_s"] = eval_s
            if epochs is None:
                epochs = max(1, 1 + int((config["budget_s"] - elapsed) // (steady + eval_s)))
                total_steps = epochs * steps_per_epoch
        if epoch < epochs and elapsed + result["epoch_s"] + eval_s > config["budget_s"] + 30:
            result["error"] = f"stopped after {epoch} of {epochs} epochs: budget_s={config['budget_s']:.0f}"
            break
    result |= {"epochs_planned": epochs, "epochs_done": epoch, "train_s": time.perf_counter() - t_start}
    return result


if __name__ == "__main__":
    sys.exit(main())
