"""Regenerates the sample outputs that the guides include (`docs/samples/*.txt`).

Run from the repository root after changing a command-line option, a model or the memory estimator:

    python docs/generate_samples.py            # rewrites docs/samples/*.txt
    python docs/generate_samples.py --check    # exits 1 and names the samples that are out of date

Every sample is cheap (a few seconds in all): `--help` of the four command-line tools (formatted
to a fixed width, and as on a CPU with native bfloat16, the machine the guides describe, so that the
text does not depend on where it is generated), a `model.summary()` of a small RevNet,
`tf_revnet.memory.estimate` of RevNet-38, the two export lines of a training run's summary and the
refusal of a decompression bomb. `tests/test_docs.py` runs `--check`.
"""

import argparse
import contextlib
import io
import os
import pathlib
import struct
import sys
import zlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "docs" / "samples"
HELP_COLUMNS = 100
SUMMARY_COLUMNS = 80


@contextlib.contextmanager
def _columns(width):
    """A fixed terminal width for argparse and Keras' (rich) summary."""
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if columns is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = columns


@contextlib.contextmanager
def _help_as_documented():
    """Fixed help width, and the precision advice of a CPU with native bfloat16."""
    from training import precision

    native = precision.native_bfloat16
    precision.native_bfloat16 = lambda cpuinfo=None: "avx512_bf16"
    try:
        with _columns(HELP_COLUMNS):
            yield
    finally:
        precision.native_bfloat16 = native


def _help(module_name):
    import importlib

    with _help_as_documented():
        module = importlib.import_module(module_name)
        parser = (module.command_line.build_parser() if module_name == "training.train"
                  else module.build_parser())
        return parser.format_help()


def model_summary():
    import tf_revnet

    model = tf_revnet.models.RevNet(units=[1, 1, 1], widths=[8, 8, 16, 32], input_shape=(32, 32, 3))
    lines = []
    with _columns(SUMMARY_COLUMNS):
        model.summary(line_length=SUMMARY_COLUMNS, print_fn=lambda line, **kwargs: lines.append(line))
    return "\n".join(lines).rstrip() + "\n"


def memory_estimate():
    import tf_revnet

    return str(tf_revnet.memory.estimate(tf_revnet.models.RevNet38(), batch_size=64)) + "\n"


def export_lines():
    from training import export

    return (f"Exported version 3 to saved_models/revnet38/3\n"
            f"{export.pin_hint('revnet38', 3)}\n")


def _png_header(width, height):
    """The first bytes of a PNG file: signature and IHDR chunk (8-bit RGB), no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(
        ">I", zlib.crc32(chunk))


def refusal():
    import tensorflow as tf

    from training import image_safety

    try:
        image_safety.check_image(_png_header(20000, 20000), name="image_bytes[2]")
    except tf.errors.InvalidArgumentError as error:
        return image_safety.refusal_reason(error) + "\n"
    raise AssertionError("a 20000 x 20000 PNG header was not refused")


SAMPLES_BY_NAME = {
    "train_help.txt": lambda: _help("training.train"),
    "evaluate_help.txt": lambda: _help("training.evaluate"),
    "export_help.txt": lambda: _help("training.export"),
    "predict_help.txt": lambda: _help("training.predict"),
    "model_summary.txt": model_summary,
    "memory_estimate.txt": memory_estimate,
    "export_lines.txt": export_lines,
    "refusal.txt": refusal,
}


def generate():
    """Returns `{file name: text}` for every sample."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, str(REPO_ROOT))
    with contextlib.redirect_stdout(io.StringIO()):  # keeps library chatter out of the samples
        return {name: make() for name, make in SAMPLES_BY_NAME.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with docs/samples/ instead of writing; exit 1 if any differs")
    args = parser.parse_args(argv)
    samples = generate()
    if args.check:
        stale = [name for name, text in samples.items()
                 if not (SAMPLES / name).exists() or (SAMPLES / name).read_text() != text]
        for name in stale:
            print(f"docs/samples/{name} is out of date: run python docs/generate_samples.py")
        return 1 if stale else 0
    SAMPLES.mkdir(exist_ok=True)
    for name, text in samples.items():
        (SAMPLES / name).write_text(text)
        print(f"wrote docs/samples/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
