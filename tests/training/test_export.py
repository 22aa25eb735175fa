"""Tests of the serving export: training/export.py, serving_signatures.py and serving_layout.py.

The tiny RevNet of the suite's training run (`trained`, conftest.py: 12 steps on real CIFAR-10
images) is exported once more with TFLite (the session fixture `exported` of `serving_fixtures.py`)
and checked: its signatures against Keras, its signature_defs (`saved_model_cli` in an opt-in slow
test), as TensorFlow Lite, and its run directory through `python -m training.export`. The one
fresh-process check (no tf_revnet) is in test_predict.py. Layout tests (concurrent versions,
injected failures) run on the standard library or on a dense model that exports in a second.
"""

import json
import os
import pathlib
import pickle
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.training import hostile_images as hostile
from tests.training.serving_fixtures import CLASSES, exported  # noqa: F401
from training import classifier, export, image_safety, serving_layout, serving_signatures

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SAVED_MODEL_CLI = pathlib.Path(sys.executable).with_name("saved_model_cli")


def _dense_classifier(classes, size=8):
    """A small non-RevNet classifier of raw pixels (fast to export)."""
    pixels = keras.Input((size, size, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 255)(pixels)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(pixels, keras.layers.Dense(classes, activation="softmax")(x))


def test_signatures_match_keras_at_two_batch_sizes(exported):  # noqa: F811
    """All three signatures give the Keras model's probabilities, class ids and names. (That they
    load and run without tf_revnet is checked in a fresh process in test_predict.py.)"""
    loaded = tf.saved_model.load(str(exported.result.path))
    for n in (1, 7):  # two batch sizes through every signature
        images = exported.images[:n]
        want = exported.expected[:n]
        for name, kwargs in [
            ("serving_default", {"images": tf.constant(images)}),
            ("serving_float", {"images": tf.constant(images.astype("float32"))}),
            ("serving_bytes", {"image_bytes": tf.constant([f.read_bytes()
                                                           for f in exported.files[:n]])}),
        ]:
            served = {k: v.numpy() for k, v in loaded.signatures[name](**kwargs).items()}
            probabilities = served["probabilities"]
            assert probabilities.dtype == np.float32 and probabilities.shape == (n, 10)
            np.testing.assert_allclose(probabilities, want, atol=1e-5, err_msg=name)
            assert served["class_ids"].dtype == np.int64
            np.testing.assert_array_equal(served["class_ids"], want.argmax(axis=1))
            names = [s.decode() for s in served["class_names"]]
            assert names == [CLASSES[i] for i in want.argmax(axis=1)]
            assert not any(k.startswith("top_k") for k in served)


def _saved_model_cli_signatures(path):
    proc = subprocess.run([str(SAVED_MODEL_CLI), "show", "--all", "--dir", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    signatures = {}
    for block in re.split(r"\nsignature_def\['", proc.stdout)[1:]:
        name = block.split("'", 1)[0]
        tensors = re.findall(r"(inputs|outputs)\['(\w+)'\] tensor_info:\s+dtype: (\w+)\s+"
                             r"shape: ([^\n]+)", block)
        signatures[name] = {(kind, key): (dtype, shape) for kind, key, dtype, shape in tensors}
    return signatures


def _signature_defs(path):
    """The signature_defs of saved_model.pb, read as TF Serving reads them, in the format
    `saved_model_cli show --all` prints: {name: {(kind, key): (dtype, shape)}}."""
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((pathlib.Path(path) / "saved_model.pb").read_bytes())

    def tensors(kind, infos):
        return {(kind, key): (types_pb2.DataType.Name(info.dtype),
                              "(" + ", ".join(str(d.size) for d in info.tensor_shape.dim) + ")")
                for key, info in infos.items()}

    return {name: {**tensors("inputs", sig.inputs), **tensors("outputs", sig.outputs)}
            for name, sig in saved.meta_graphs[0].signature_def.items()}


def _assert_expected_signatures(signatures):
    outputs = {("outputs", "probabilities"): ("DT_FLOAT", "(-1, 10)"),
               ("outputs", "class_ids"): ("DT_INT64", "(-1)"),
               ("outputs", "class_names"): ("DT_STRING", "(-1)")}
    assert signatures["serving_default"] == {("inputs", "images"): ("DT_UINT8", "(-1, 32, 32, 3)"),
                                             **outputs}
    assert signatures["serving_float"] == {("inputs", "images"): ("DT_FLOAT", "(-1, 32, 32, 3)"),
                                           **outputs}
    assert signatures["serving_bytes"] == {("inputs", "image_bytes"): ("DT_STRING", "(-1)"),
                                           **outputs}


def test_signature_defs_have_the_documented_dtypes_and_shapes(exported):  # noqa: F811
    _assert_expected_signatures(_signature_defs(exported.result.path))


@pytest.mark.slow  # the same signature_defs as the test above, printed by the CLI (TF start-up)
def test_saved_model_cli_lists_signatures(exported):  # noqa: F811
    _assert_expected_signatures(_saved_model_cli_signatures(exported.result.path))


def _gradient_override_nodes(graph_def):
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return [n.name for n in nodes if "_gradient_op_type" in n.attr]


def test_export_is_inference_only(exported):  # noqa: F811
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((exported.result.path / "saved_model.pb").read_bytes())
    assert _gradient_override_nodes(saved.meta_graphs[0].graph_def) == []
    # Control: tracing the same model in training mode does put the custom gradient in a graph.
    spec = tf.TensorSpec((None, 32, 32, 3), tf.float32)
    graph = tf.function(lambda x: exported.model(x, training=True)).get_concrete_function(spec).graph
    assert _gradient_override_nodes(graph.as_graph_def())


def test_version_carries_class_names_and_run_info(exported):  # noqa: F811
    path = exported.result.path
    assert exported.result.version == 1 and path == exported.base_path / "1"
    assert (path / "assets.extra" / "class_names.txt").read_text().splitlines() == list(CLASSES)
    info = json.loads((path / "assets.extra" / "export.json").read_text())
    assert info["version"] == 1 and info["model"] == "tiny_revnet"
    run_config = json.loads((exported.run_dir / "config.json").read_text())
    assert info["run_config"] == run_config  # the run's finished config.json, as written
    assert info["test_accuracy"] == run_config["test_accuracy"] and run_config["finished"]
    assert info["image_size"] == [32, 32] and info["class_names"] == list(CLASSES)
    assert info["max_image_pixels"] == image_safety.DEFAULT_MAX_IMAGE_PIXELS == 100_000_000
    assert sorted(p.name for p in exported.base_path.iterdir()) == ["1"]


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_tflite_agrees_on_top1(exported):  # noqa: F811
    interpreter = tf.lite.Interpreter(model_path=str(exported.result.tflite_path))
    assert exported.result.tflite_path == exported.result.path / "model.tflite"
    assert set(interpreter.get_signature_list()) == {"serving_default", "serving_float"}
    for name, images in [("serving_default", exported.images),
                         ("serving_float", exported.images.astype("float32"))]:
        outputs = interpreter.get_signature_runner(name)(images=images)
        np.testing.assert_array_equal(outputs["class_ids"], exported.expected.argmax(axis=1))
        np.testing.assert_allclose(outputs["probabilities"], exported.expected, atol=1e-4)
        assert [s.decode() for s in outputs["class_names"]] == [
            CLASSES[i] for i in exported.expected.argmax(axis=1)]


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_tflite_with_select_tf_ops_holds_the_bytes_signature(tmp_path):
    model = _dense_classifier(classes=3)
    result = export.export_saved_model(model, tmp_path / "m", ["a", "b", "c"], tflite=True,
                                       tflite_select_tf_ops=True)
    interpreter = tf.lite.Interpreter(model_path=str(result.tflite_path))
    assert set(interpreter.get_signature_list()) == set(serving_signatures.SIGNATURES)
    images = np.random.default_rng(4).integers(0, 256, (3, 8, 8, 3)).astype("uint8")
    outputs = interpreter.get_signature_runner("serving_default")(images=images)
    np.testing.assert_allclose(outputs["probabilities"],
                               model.predict(images.astype("float32"), verbose=0), atol=1e-5)
    # Decoding (and the header checks before it: string formatting, byte gathers in a loop)
    # needs the Flex delegate, which TF 2.21's pip interpreter does not link in.
    files = np.array([tf.io.encode_png(x).numpy() for x in images], dtype=object)
    with pytest.raises(RuntimeError, match=r"Select TensorFlow op\(s\).*Flex"):
        interpreter.get_signature_runner("serving_bytes")(image_bytes=files)


def test_top_k_outputs_for_more_than_ten_classes(tmp_path):
    model = _dense_classifier(classes=12)
    names = [f"class_{i:02d}" for i in range(12)]
    result = export.export_saved_model(model, tmp_path / "m", names, top_k=3)
    serve = tf.saved_model.load(str(result.path)).signatures["serving_default"]
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3)).astype("uint8")
    outputs = {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}
    want = model.predict(images.astype("float32"), verbose=0)
    order = np.argsort(-want, axis=1)[:, :3]
    np.testing.assert_array_equal(outputs["top_k_class_ids"], order)
    np.testing.assert_allclose(outputs["top_k_probabilities"],
                               np.take_along_axis(want, order, axis=1), atol=1e-6)
    assert outputs["top_k_class_names"].shape == (5, 3)
    assert outputs["top_k_class_names"][0, 0].decode() == names[order[0, 0]]
    assert outputs["class_ids"].tolist() == order[:, 0].tolist()


def test_bytes_signature_decodes_png_of_any_size(tmp_path):
    model = _dense_classifier(classes=3)
    result = export.export_saved_model(model, tmp_path / "m", ["a", "b", "c"])
    loaded = tf.saved_model.load(str(result.path))
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (8, 8, 3)).astype("uint8")
    large = rng.integers(0, 256, (20, 13, 3)).astype("uint8")
    gray = rng.integers(0, 256, (8, 8, 1)).astype("uint8")
    files = [tf.io.encode_png(x).numpy() for x in (small, large, gray)]
    out = loaded.signatures["serving_bytes"](image_bytes=tf.constant(files))["probabilities"]
    want = model.predict(np.stack([
        small, tf.cast(tf.image.resize(large, (8, 8)), tf.float32).numpy(), np.repeat(gray, 3, -1),
    ]).astype("float32"), verbose=0)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-5)


# ---- hostile requests to serving_bytes (issue 21) ----------------------------------------------

HOSTILE_SERVER_SCRIPT = textwrap.dedent(
    """
    import ctypes, gc, json, pathlib, pickle, sys
    import tensorflow as tf

    export_dir, requests_file = sys.argv[1:3]
    libc = ctypes.CDLL("libc.so.6")

    def status_mb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

    serve = tf.saved_model.load(export_dir).signatures["serving_bytes"]

    def call(batch):
        try:
            names = serve(image_bytes=tf.constant(batch))["class_names"].numpy()
            return "answered", [n.decode() for n in names]
        except tf.errors.InvalidArgumentError as e:
            return "refused", e.message

    requests = pickle.loads(pathlib.Path(requests_file).read_bytes())
    good = requests.pop("warm_up")
    call(good)  # traces nothing (a loaded SavedModel) but creates the kernels of every format
    results = {}
    for name, batch in requests.items():
        gc.collect()
        libc.malloc_trim(0)
        before = status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        outcome, detail = call(batch)
        peak = status_mb("VmHWM") - before
        results[name] = {"outcome": outcome, "detail": detail, "peak_mb": peak,
                         "next": call(good)}
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def dense_export(tmp_path_factory):
    """A fresh export of the smallest classifier (8x8 images, 3 classes): what serving_bytes
    costs is then the decoding, not the model."""
    model = _dense_classifier(classes=3)
    base = tmp_path_factory.mktemp("hostile") / "m"
    return model, export.export_saved_model(model, base, ["a", "b", "c"])


def test_hostile_requests_are_refused_in_a_few_mb_in_a_fresh_server(dense_export, tmp_path):
    """Issue 21's table in a fresh process that loads the export (as TF Serving does: no Python
    of ours): each request's peak memory (VmHWM, reset before it) and its answer; the request
    after each one is answered normally."""
    _, result = dense_export
    rng = np.random.default_rng(5)
    photo = tf.io.encode_jpeg(rng.integers(0, 256, (48, 40, 3)).astype("uint8")).numpy()
    small_png = tf.io.encode_png(np.full((256, 256, 3), 90, np.uint8)).numpy()
    png_bomb = hostile.png_of_zeros(20000, 20000)
    gif_bomb = hostile.gif_of_zeros(2000, 2000, frames=100)
    gif_allowed = hostile.gif_of_zeros(2000, 2000, frames=24)  # 96 megapixels: under the limit
    requests = {
        "warm_up": [photo, small_png, hostile.gif_of_zeros(20, 10, 2),
                    _bmp(rng.integers(0, 256, (9, 7, 3)).astype("uint8"))],
        "png_bomb": [png_bomb],
        "gif_bomb": [gif_bomb],
        "jpeg_claiming_65535": [hostile.jpeg_claiming(photo, 65535, 65535)],
        # 10000 x 10000 progressive: +875 MB (3 components) / +1066 MB (CMYK) if decoded.
        "jpeg_progressive_10000": [hostile.jpeg_progressive(10000, 10000, 3)],
        "jpeg_progressive_cmyk_10000": [hostile.jpeg_progressive(10000, 10000, 4)],
        "png_corrupt_ihdr": [hostile.png_with_ihdr(64, 64, kind=b"IHDX")],
        "png_truncated_data": [small_png[:len(small_png) // 2]],
        "zero_length": [b""],
        "not_an_image": [b"GET / HTTP/1.1\r\n\r\n"],
        "mixed_batch": [photo, photo, png_bomb, small_png],
        "many_small_images": [small_png] * 1000,
        "control_allowed_png_4000x4000": [hostile.png_of_zeros(4000, 4000)],
        "control_allowed_gif_24_frames": [gif_allowed],
    }
    requests_file = tmp_path / "requests.pkl"
    requests_file.write_bytes(pickle.dumps(requests))
    script = tmp_path / "server.py"
    script.write_text(HOSTILE_SERVER_SCRIPT)
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "MALLOC_MMAP_THRESHOLD_": "131072",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, str(script), str(result.path), str(requests_file)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print({name: round(r["peak_mb"], 1) for name, r in results.items()})
    for name, r in results.items():  # every request is followed by a normal answer
        assert r["next"][0] == "answered" and len(r["next"][1]) == 4, name
    reasons = {name: image_safety.refusal_reason(r["detail"]) for name, r in results.items()
               if r["outcome"] == "refused"}
    limit = "over the limit of 100000000 pixels (max_image_pixels); refused before decoding"
    assert reasons["png_bomb"] == f"image_bytes[0]: 20000 x 20000 pixels x 1 frame = 400000000 " \
        f"pixels, {limit}"
    assert reasons["gif_bomb"] == f"image_bytes[0]: 2000 x 2000 pixels x 100 frames = 400000000 " \
        f"pixels, {limit}"
    assert reasons["jpeg_claiming_65535"] == ("image_bytes[0]: 65535 x 65535 pixels x 1 frame = "
                                              f"4294836225 pixels, {limit}")
    assert reasons["jpeg_progressive_10000"].startswith(
        "image_bytes[0]: 10000 x 10000 pixels x 1 frame = 100000000 pixels, a progressive JPEG "
        "with 3 components: charged as 300000000 pixels")
    assert "progressive JPEG with 4 components: charged as 366666667 pixels" in \
        reasons["jpeg_progressive_cmyk_10000"]
    assert reasons["png_corrupt_ihdr"].startswith("image_bytes[0]: corrupt or truncated PNG header")
    assert reasons["zero_length"] == ("image_bytes[0]: not a JPEG, PNG, GIF or BMP file (0 bytes); "
                                      "refused before decoding")
    assert reasons["not_an_image"].startswith("image_bytes[0]: not a JPEG, PNG, GIF or BMP file")
    # A good image beside a bomb is not silently dropped: the request fails, naming the bomb.
    assert reasons["mixed_batch"].startswith("image_bytes[2]: 20000 x 20000 pixels")
    # Data cut after a valid header: the decoder's own error (no index), after the size check.
    assert results["png_truncated_data"]["outcome"] == "refused"
    assert reasons["png_truncated_data"] is None
    for name in reasons:
        assert results[name]["peak_mb"] < 10, (name, results[name]["peak_mb"])
    # 1000 images of 256 x 256: memory grows with the resized (8, 8, 3) tensors, not with the
    # 197 MB the decoded originals would hold together.
    assert results["many_small_images"]["outcome"] == "answered"
    assert len(results["many_small_images"]["detail"]) == 1000
    assert results["many_small_images"]["peak_mb"] < 20
    # Controls: the measurement sees decoding (a 4000 x 4000 PNG is 48 MB as RGB), and of an
    # allowed animated GIF only the first frame is decoded (its 24 frames are 96 MB of raster).
    assert results["control_allowed_png_4000x4000"]["outcome"] == "answered"
    assert results["control_allowed_png_4000x4000"]["peak_mb"] > 40
    assert results["control_allowed_gif_24_frames"]["outcome"] == "answered"
    assert results["control_allowed_gif_24_frames"]["peak_mb"] < 40


def test_max_image_pixels_is_recorded_and_enforced(tmp_path):
    model = _dense_classifier(classes=3)
    result = export.export_saved_model(model, tmp_path / "m", ["a", "b", "c"], max_image_pixels=100)
    info = json.loads((result.path / "assets.extra" / "export.json").read_text())
    assert info["max_image_pixels"] == 100
    serve = tf.saved_model.load(str(result.path)).signatures["serving_bytes"]
    rng = np.random.default_rng(6)
    inside, over = (tf.io.encode_png(rng.integers(0, 256, shape).astype("uint8")).numpy()
                    for shape in ((10, 10, 3), (20, 13, 3)))
    assert serve(image_bytes=tf.constant([inside]))["probabilities"].shape == (1, 3)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        serve(image_bytes=tf.constant([inside, over]))
    assert image_safety.refusal_reason(error.value) == (
        "image_bytes[1]: 13 x 20 pixels x 1 frame = 260 pixels, over the limit of 100 pixels "
        "(max_image_pixels); refused before decoding")
    with pytest.raises(ValueError, match="`max_image_pixels` must be a positive integer. "
                                         "Received: 0"):
        export.export_saved_model(model, tmp_path / "m", ["a", "b", "c"], max_image_pixels=0)


def _bmp(pixels):
    """An uncompressed 24-bit BMP (bottom-up rows, padded to 4 bytes) of uint8 (H, W, 3) RGB."""
    height, width, _ = pixels.shape
    row = width * 3 + (-width * 3) % 4
    rows = b"".join(pixels[y, :, ::-1].tobytes().ljust(row, b"\0") for y in range(height - 1, -1, -1))
    header = b"BM" + (54 + len(rows)).to_bytes(4, "little") + b"\0\0\0\0" + (54).to_bytes(4, "little")
    info = (40).to_bytes(4, "little") + width.to_bytes(4, "little") + height.to_bytes(4, "little") \
        + (1).to_bytes(2, "little") + (24).to_bytes(2, "little") + b"\0" * 24
    return header + info + rows


def test_rejects_bad_model_or_class_names(tmp_path):
    with pytest.raises(ValueError, match="`class_names` must have one name per class .*3"):
        export.export_saved_model(_dense_classifier(3), tmp_path / "m", ["a", "b"])
    flexible = keras.Input((None, None, 3))
    model = keras.Model(flexible, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(flexible)))
    with pytest.raises(ValueError, match="fixed size"):
        export.export_saved_model(model, tmp_path / "m", ["a", "b"])
    assert not (tmp_path / "m").exists() or serving_layout.list_versions(tmp_path / "m") == []


def test_new_versions_never_overwrite(tmp_path):
    model = _dense_classifier(classes=2)
    base = tmp_path / "m"
    (base / "1").mkdir(parents=True)
    (base / "1" / "keep.txt").write_text("version 1 stays")
    (base / "notes").mkdir()
    first = export.export_saved_model(model, base, ["a", "b"])
    second = export.export_saved_model(model, base, ["a", "b"])
    assert (first.version, second.version) == (2, 3)
    assert (base / "1" / "keep.txt").read_text() == "version 1 stays"
    assert serving_layout.list_versions(base) == [1, 2, 3]


def test_injected_failure_leaves_no_partial_version(tmp_path, monkeypatch):
    model = _dense_classifier(classes=2)
    base = tmp_path / "m"
    export.export_saved_model(model, base, ["a", "b"])

    def fail(directory, *args):
        assert (directory / "saved_model.pb").is_file()  # the SavedModel was half-way done
        raise OSError("disk full (injected)")

    monkeypatch.setattr(export, "_write_extras", fail)
    with pytest.raises(OSError, match="injected"):
        export.export_saved_model(model, base, ["a", "b"])
    assert sorted(p.name for p in base.iterdir()) == ["1"]
    monkeypatch.undo()
    assert export.export_saved_model(model, base, ["a", "b"]).version == 2


CONCURRENT_SCRIPT = textwrap.dedent(
    """
    import pathlib, sys, time
    from training import serving_layout

    base, tag = sys.argv[1], sys.argv[2]
    def write(directory, version):
        (directory / "owner").write_text(tag)
        time.sleep(0.01)  # widen the race window
    for _ in range(5):
        version, path = serving_layout.write_new_version(base, write)
        print(version)
    assert "tensorflow" not in sys.modules
    """
)


def test_concurrent_exports_get_distinct_versions(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(CONCURRENT_SCRIPT)
    base = tmp_path / "m"
    procs = [subprocess.Popen([sys.executable, str(script), str(base), f"writer{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
             for i in range(4)]
    claimed = {}
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        for line in out.split():
            assert int(line) not in claimed, f"version {line} given twice"
            claimed[int(line)] = f"writer{i}"
    assert sorted(claimed) == list(range(1, 21))
    assert sorted(p.name for p in base.iterdir()) == sorted(map(str, claimed))
    for version, owner in claimed.items():
        assert (base / str(version) / "owner").read_text() == owner


def test_layout_skips_published_and_pending_numbers(tmp_path):
    base = tmp_path / "m"
    (base / "4").mkdir(parents=True)
    (base / ".pending-6").mkdir()  # an export in progress (or killed)
    version, pending = serving_layout.reserve_version(base)
    assert version == 7 and pending == base / ".pending-7" and pending.is_dir()
    with pytest.raises(ValueError, match="is itself a SavedModel"):
        (base / "4" / "saved_model.pb").write_bytes(b"")
        serving_layout.reserve_version(base / "4")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        serving_layout.reserve_version(tmp_path / "file")


# ---- python -m training.export ---------------------------------------------------------------


def _dense_build_classifier(model_name, image_shape, num_classes, normalizer,
                            use_custom_gradient=True):
    """Stands in for `classifier.build_classifier` of a zoo model (fast): same call, raw pixels in."""
    assert model_name == "dense" and tuple(image_shape) == (8, 8, 3) and num_classes == 3
    pixels = keras.Input((8, 8, 3), name="pixels")
    x = keras.layers.GlobalAveragePooling2D()(normalizer(pixels))
    return keras.Model(pixels, keras.layers.Dense(num_classes, activation="softmax")(x))


@pytest.fixture
def dense_run(tmp_path, monkeypatch):
    """A finished training run's --model-dir (config.json, model.weights.h5) of a dense model."""
    monkeypatch.setattr(classifier, "build_classifier", _dense_build_classifier)
    normalizer = keras.layers.Normalization(axis=-1)  # adapted, as training does
    normalizer.adapt(np.random.default_rng(3).uniform(0, 255, (16, 8, 8, 3)).astype("float32"))
    model = _dense_build_classifier("dense", (8, 8, 3), 3, normalizer)
    run = tmp_path / "dense_run"
    run.mkdir()
    model.save_weights(run / "model.weights.h5")
    (run / "config.json").write_text(json.dumps({
        "model": "dense", "image_shape": [8, 8, 3], "class_names": ["cat", "dog", "eel"],
        "use_custom_gradient": True, "test_accuracy": 0.5, "recipe": {"epochs": 1}}))
    images = np.random.default_rng(2).integers(0, 256, (6, 8, 8, 3)).astype("uint8")
    return run, model, images


def _served(path, images):
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return serve(images=tf.constant(images))["probabilities"].numpy()


def test_cli_exports_a_run_dir(exported, tmp_path, capsys):  # noqa: F811
    """The shared training run's directory, as `python -m training.train` wrote it: load_run
    rebuilds the model from its config.json (model, image_shape, class_names) with
    classifier.build_classifier and the weights."""
    run = exported.run_dir
    config = json.loads((run / "config.json").read_text())
    base = tmp_path / "served"
    assert export.main(["--model-dir", str(run), "--export-dir", str(base)]) == 0
    out = capsys.readouterr().out
    assert (f"Exported tiny_revnet version 1 to {base / '1'} (test accuracy: "
            f"{config['test_accuracy']:.4f})") in out
    assert "model_version_policy { specific { versions: 1 } }" in out
    np.testing.assert_allclose(_served(base / "1", exported.images), exported.expected, atol=1e-5)
    info = json.loads((base / "1" / "assets.extra" / "export.json").read_text())
    assert info["run_config"]["export_source"] == f"model_dir:{run.resolve()}"
    # The run's --max-image-pixels (recorded in its config.json) is the export's default.
    assert info["max_image_pixels"] == config["max_image_pixels"] == 100_000_000
    assert info["run_config"]["recipe"] == config["recipe"]
    assert info["test_accuracy"] == config["test_accuracy"]
    assert info["class_names"] == list(CLASSES)


def test_cli_exports_an_interrupted_run_with_tflite(dense_run, tmp_path, capsys):
    run, model, images = dense_run
    config = json.loads((run / "config.json").read_text())
    del config["test_accuracy"]  # written only when a run finishes
    (run / "config.json").write_text(json.dumps(config))
    base = tmp_path / "served"
    assert export.main(["--model-dir", str(run), "--export-dir", str(base),
                        "--format", "tflite", "--max-image-pixels", "5000"]) == 0
    out = capsys.readouterr().out
    assert "(test accuracy: unknown, the run did not finish)" in out
    assert f"TensorFlow Lite model: {base / '1' / 'model.tflite'}" in out
    info = json.loads((base / "1" / "assets.extra" / "export.json").read_text())
    assert info["test_accuracy"] is None and info["max_image_pixels"] == 5000


def test_load_keras_file_restores_the_revnet(exported):  # noqa: F811
    model, config = classifier.load_keras_file(exported.run_dir / "model.keras")
    assert config["class_names"] == list(CLASSES)  # from the config.json beside it
    np.testing.assert_allclose(model.predict(exported.images.astype("float32"), verbose=0),
                               exported.expected, atol=1e-6)


def test_cli_exports_a_keras_file(dense_run, tmp_path, capsys):
    run, model, images = dense_run
    model.save(run / "model.keras")
    base = tmp_path / "served"
    assert export.main(["--keras-file", str(run / "model.keras"), "--export-dir", str(base),
                        "--class-names", "ant,bee,cow"]) == 0
    assert "Exported dense version 1" in capsys.readouterr().out
    want = model.predict(images.astype("float32"), verbose=0)
    np.testing.assert_allclose(_served(base / "1", images), want, atol=1e-6)
    assert (base / "1" / "assets.extra" / "class_names.txt").read_text().split() == [
        "ant", "bee", "cow"]  # --class-names wins over the config.json beside the file


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_tflite_of_a_mixed_precision_keras_file_is_one_line_naming_model_dir(policy, tmp_path,
                                                                           capsys):
    """The `.keras` file of a `--mixed-precision` run computes in (b)float16, which TFLite's
    built-in ops refuse (a 1,000-line converter dump): one line, the fix, no version left."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        model = _dense_classifier(classes=3)
    finally:
        keras.config.set_dtype_policy(previous)
    model.save(tmp_path / "model.keras")
    base = tmp_path / "served"
    err = _error(["--keras-file", str(tmp_path / "model.keras"), "--export-dir", str(base),
                  "--class-names", "a,b,c", "--format", "tflite"], capsys)
    low = policy.split("_")[1]
    assert f"--format tflite: --keras-file holds a model that computes in {low}" in err
    assert "--model-dir" in err and "float32" in err
    assert not base.exists() or not any(base.iterdir())


def _error(argv, capsys):
    assert export.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("python -m training.export: error: ")
    return err


def test_cli_one_line_errors(exported, dense_run, tmp_path, capsys):  # noqa: F811
    base = ["--export-dir", str(tmp_path / "served")]
    run = tmp_path / "run"
    err = _error(["--model-dir", str(run), *base], capsys)
    assert f"--model-dir {run}: not a directory" in err
    err = _error(["--model-dir", str(dense_run[0]), "--max-image-pixels", "0", *base], capsys)
    assert err.endswith("--max-image-pixels 0: must be >= 1")
    err = _error(["--model-dir", str(dense_run[0]), "--max-image-pixels",
                  "99999999999999999999999", *base], capsys)
    assert err.endswith("--max-image-pixels 99999999999999999999999: must be at most "
                        "9223372036854775807")
    run.mkdir()
    assert f"--model-dir {run}: no config.json" in _error(["--model-dir", str(run), *base], capsys)
    (run / "config.json").write_text((dense_run[0] / "config.json").read_text())
    err = _error(["--model-dir", str(run), *base], capsys)
    assert "no model.weights.h5" in err and "finished" in err
    (run / "model.weights.h5").write_bytes(b"\x89HDF\r\n" + b"truncated" * 10)
    err = _error(["--model-dir", str(run), *base], capsys)
    assert "cannot read model.weights.h5 (corrupt" in err
    (run / "model.keras").write_bytes(b"PK\x03\x04 not a zip")
    err = _error(["--keras-file", str(run / "model.h5"), *base], capsys)
    assert "must end in .keras" in err
    err = _error(["--keras-file", str(run / "model.keras"), *base], capsys)
    assert "cannot load it (corrupt" in err
    err = _error(["--keras-file", str(run / "missing.keras"), *base], capsys)
    assert "no such file" in err
    # A .keras file with no config.json beside it needs --class-names.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.keras").write_bytes((exported.run_dir / "model.keras").read_bytes())
    err = _error(["--keras-file", str(lone / "model.keras"), *base], capsys)
    assert "--class-names" in err
    err = _error(["--keras-file", str(lone / "model.keras"), "--class-names", "a,b", *base], capsys)
    assert "10 classes, got 2 names" in err
    # A version directory instead of the base path.
    err = _error(["--model-dir", str(dense_run[0]), "--export-dir",
                  str(exported.result.path)], capsys)
    assert "is itself a SavedModel" in err
    assert not (tmp_path / "served").exists()  # no failed attempt left anything


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    options = [a.option_strings[-1] for a in export.build_parser()._actions if a.option_strings]
    assert len(options) >= 7
    for option in options:
        assert option in out
    assert "--model-dir" in out and "--keras-file" in out and "tflite" in out


def test_help_defaults_match_the_modules_they_stand_for():
    """export.py and command_line.py state these defaults without importing TensorFlow."""
    from training import command_line

    assert export.TOP_K == serving_signatures.TOP_K
    assert export.TOP_K_MIN_CLASSES == serving_signatures.TOP_K_MIN_CLASSES
    assert export.DEFAULT_MAX_IMAGE_PIXELS == image_safety.DEFAULT_MAX_IMAGE_PIXELS
    assert command_line.DEFAULT_MAX_IMAGE_PIXELS == image_safety.DEFAULT_MAX_IMAGE_PIXELS
    assert command_line.MAX_IMAGE_PIXELS == image_safety.MAX_LIMIT == 2**63 - 1


def test_serving_guide_shows_the_pin_line_the_code_prints():
    sample = (REPO_ROOT / "docs" / "samples" / "export_lines.txt").read_text()
    assert f"\n{export.pin_hint('revnet38', 3)}\n" in sample
    assert '--8<-- "samples/export_lines.txt"' in (REPO_ROOT / "docs" / "serving.md").read_text()
