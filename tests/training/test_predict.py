"""Tests of training/predict.py (the client of an export) and of docs/serving.md's REST request bodies.

No TF Serving server can be installed on these machines, so the REST requests are checked by
decoding them as TF Serving's REST API documents its row format (`instances`, `{"b64": ...}` for
binary strings) and feeding the tensors to the loaded signatures; the `--server` client is run
against a small HTTP server that does the same. The export is the session fixture of
`serving_fixtures.py` (the tiny RevNet of the suite's training run, conftest.py, on real CIFAR-10
images).
"""

import base64
import http.server
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import tensorflow as tf

from tests.training import hostile_images as hostile
from tests.training.serving_fixtures import CLASSES, exported  # noqa: F401
from training import predict

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVING_GUIDE = REPO_ROOT / "docs" / "serving.md"
GUIDE_IMAGE = "/tmp/cifar10/test/cat/0000.jpg"


def _parse_output(stdout):
    """`path: name p, name p` lines -> {path: [(name, p), ...]}."""
    parsed = {}
    for line in stdout.strip().splitlines():
        path, rest = line.split(": ", 1)
        parsed[path] = [(item.rsplit(" ", 1)[0], float(item.rsplit(" ", 1)[1]))
                        for item in rest.split(", ")]
    return parsed


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import os, runpy, sys

    def command_line(*argv):
        # What `python -m training.predict ARGV` does (runpy runs the module as __main__).
        sys.argv = ["python -m training.predict", *argv]
        try:
            runpy.run_module("training.predict", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            return e.code
        return None

    version, inputs_path, outputs_path, bad_image = sys.argv[1:5]
    client_argv = sys.argv[5:]
    # 1. The client command line first, in a process that has not imported TensorFlow yet.
    assert "tensorflow" not in sys.modules
    assert command_line(*client_argv) == 0
    sys.stdout.flush()
    os.write(2, b"--- next ---\\n")
    # 2. The same command on a truncated JPEG alone: one line naming the file (no libjpeg lines).
    assert command_line(version, bad_image) == 2
    sys.stderr.flush()
    os.write(2, b"--- next ---\\n")
    # The client used training/predict.py (its start-up helper, its header checks) only: no
    # tf_revnet.
    assert "tf_revnet" not in sys.modules, sorted(m for m in sys.modules if "revnet" in m)
    others = [m for m in sys.modules if m == "training" or m.startswith("training.")]
    assert set(others) <= {"training", "training.predict", "training.startup",
                           "training.image_safety"}, others

    # 3. The export alone through serving_default: TensorFlow, no tf_revnet.
    import numpy as np
    import tensorflow as tf

    serve = tf.saved_model.load(version).signatures["serving_default"]
    np.save(outputs_path, serve(images=tf.constant(np.load(inputs_path)))["probabilities"].numpy())
    assert "tf_revnet" not in sys.modules, sorted(m for m in sys.modules if "revnet" in m)
    """
)

# What TensorFlow and libjpeg print on stderr at start-up and decoding when nothing silences them
# (glog-format lines such as "I0000 00:00:1796059161.151648 3958 cudart_stub.cc:31] Could not find
# cuda drivers", "failed call to cuInit", the absl notice, the CPU instruction notice).
TF_NOISE = re.compile(r"absl|cudart|cuInit|cuda|cpu_feature_guard|To enable the following|"
                      r"^[IWEF]\d{4} \d\d:\d\d:|JPEG", re.IGNORECASE | re.MULTILINE)


def test_export_and_client_in_fresh_process_without_tf_revnet(exported, tmp_path):  # noqa: F811
    """The suite's one fresh-process serving test: the client command line (as `python -m
    training.predict` runs) on files and folders, then on a truncated JPEG, and the export through
    serving_default (same probabilities as Keras), in a process that never imports tf_revnet (nor
    the rest of training/). Its stderr holds no TensorFlow start-up or libjpeg line: only the
    one-line error of the truncated file."""
    folder = tmp_path / "photos"
    for i, f in enumerate(exported.files[:12]):
        (folder / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, folder / f"sub{i % 2}" / f"{i:02d}.jpg")
    (folder / "notes.txt").write_text("not an image")
    single = exported.files[12]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(exported.files[0].read_bytes()[:600])  # truncated: libjpeg complains
    np.save(tmp_path / "inputs.npy", exported.images[:7])
    script = tmp_path / "client.py"
    script.write_text(FRESH_PROCESS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run(
        [sys.executable, str(script), str(exported.result.path), str(tmp_path / "inputs.npy"),
         str(tmp_path / "outputs.npy"), str(bad), str(exported.base_path), str(single),
         str(folder), "--top", "3", "--batch-size", "5"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client_err, bad_err, rest_err = proc.stderr.split("--- next ---\n")
    assert client_err == "", client_err
    assert bad_err.splitlines() == [
        "python -m training.predict: error: no image to classify; skipped 1 file(s) it cannot "
        f"classify: {bad} (cannot decode it (not a JPEG, PNG, GIF or BMP file, or truncated))"], \
        bad_err
    assert not TF_NOISE.search(rest_err), rest_err
    np.testing.assert_allclose(np.load(tmp_path / "outputs.npy"), exported.expected[:7], atol=1e-5)
    parsed = _parse_output(proc.stdout)
    order = [single] + sorted(folder.rglob("*.jpg"))
    assert list(parsed) == [str(p) for p in order]
    for path, top in parsed.items():
        index = 12 if path == str(single) else int(pathlib.Path(path).stem)
        want = exported.expected[index]
        ids = np.argsort(-want)[:3]
        assert [name for name, _ in top] == [CLASSES[i] for i in ids], path
        np.testing.assert_allclose([p for _, p in top], want[ids], atol=6e-4)


def test_decode_predictions_and_class_names(exported):  # noqa: F811
    export_dir = predict.resolve_export_dir(exported.base_path)
    assert export_dir == exported.result.path
    names = predict.read_class_names(export_dir)
    assert names == list(CLASSES)
    decoded = predict.decode_predictions(exported.expected, names, top=4)
    assert len(decoded) == len(exported.expected)
    for row, want in zip(decoded, exported.expected):
        ids = np.argsort(-want)[:4]
        assert [i for i, _, _ in row] == ids.tolist()
        assert [name for _, name, _ in row] == [CLASSES[i] for i in ids]
        np.testing.assert_allclose([p for _, _, p in row], want[ids])
    assert len(predict.decode_predictions(exported.expected[:1], names, top=50)[0]) == 10
    with pytest.raises(ValueError, match=r"shape \(N, 10\)"):
        predict.decode_predictions(exported.expected[:, :3], names)


def test_resolve_export_dir_and_one_line_errors(exported, tmp_path, capsys):  # noqa: F811
    base = tmp_path / "m"
    shutil.copytree(exported.result.path, base / "2")
    (base / "9").mkdir()  # an empty number (e.g. copied by hand): not a SavedModel, skipped
    assert predict.resolve_export_dir(base) == base / "2"
    assert predict.resolve_export_dir(base / "2") == base / "2"
    for argv, message in [
        ([str(tmp_path / "none"), str(exported.files[0])], "neither a SavedModel"),
        ([str(base), str(tmp_path / "missing.jpg")], "no such file or folder"),
        ([str(base), str(tmp_path)], "no image files"),
        (["--rest-request", "serving_float", str(exported.files[0])], "invalid choice"),
    ]:
        if "invalid choice" in message:
            with pytest.raises(SystemExit):
                predict.main(argv)
            assert message in capsys.readouterr().err
            continue
        assert predict.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_corrupt_images_are_skipped_and_listed(exported, tmp_path, capsys):  # noqa: F811
    """A folder with files that do not decode (cut in the header, cut in the data, not an image)
    and others: the others are classified (as alone), the bad ones listed in one line, exit 1."""
    photos = tmp_path / "photos"
    photos.mkdir()
    bad = photos / "b.jpg"
    bad.write_bytes(exported.files[0].read_bytes()[:40])  # truncated in the header
    cut = photos / "c.jpg"
    cut.write_bytes(exported.files[0].read_bytes()[:600])  # valid header, truncated data
    text = photos / "d.png"
    text.write_text("not an image")
    shutil.copy(exported.files[1], photos / "a.jpg")
    shutil.copy(exported.files[2], photos / "e.jpg")
    assert predict.main([str(exported.result.path), str(photos), "--batch-size", "8"]) == 1
    captured = capsys.readouterr()
    assert [line.split(":")[0] for line in captured.out.splitlines()] == [
        str(photos / "a.jpg"), str(photos / "e.jpg")]
    reason = "cannot decode it (not a JPEG, PNG, GIF or BMP file, or truncated)"
    assert captured.err.strip() == (
        f"python -m training.predict: skipped 3 file(s) it cannot classify: {bad} (truncated "
        f"JPEG header (40 bytes, no frame header)); {cut} ({reason}); {text} (not a JPEG, PNG, "
        "GIF or BMP file (12 bytes); refused before decoding)"), captured.err
    files, probabilities, skipped = predict.classify_readable(
        exported.result.path, [photos / "a.jpg", cut, photos / "e.jpg"])
    assert files == [photos / "a.jpg", photos / "e.jpg"] and [p for p, _ in skipped] == [cut]
    np.testing.assert_allclose(probabilities, exported.expected[1:3], atol=1e-5)


def test_folder_links_are_not_followed(exported, tmp_path, capsys):  # noqa: F811
    """A link loop inside a folder of images lists each image once."""
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    shutil.copy(exported.files[1], photos / "sub" / "a.jpg")
    (photos / "sub" / "loop").symlink_to(photos)
    assert predict.list_images([photos]) == [photos / "sub" / "a.jpg"]


def test_unreachable_server_gives_one_line_error(tmp_path, capsys):
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"\xff\xd8 not much")
    assert predict.main(["--server", "http://127.0.0.1:9/v1/models/m", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach it" in err, err


def test_pixel_rest_request_prints_no_tensorflow_noise(exported, tmp_path):  # noqa: F811
    """`--rest-request serving_default` decodes the file with TensorFlow, imported quietly: stderr
    is empty for a good file (no absl / CUDA start-up lines)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run(
        [sys.executable, "-m", "training.predict", "--rest-request", "serving_default",
         str(exported.files[0])], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
        env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr
    body = json.loads(proc.stdout)
    assert body["signature_name"] == "serving_default" and len(body["instances"]) == 1


def test_header_refusals_keep_their_reason(exported, tmp_path, capsys):  # noqa: F811
    """Refusals that are not about the size name their fault too, not a generic "cannot decode"."""
    folder = tmp_path / "photos"
    folder.mkdir()
    files = {
        "b_ihdr_length.png": hostile.png_with_ihdr(7, 5, length=0x10),
        "c_ihdr_type.png": hostile.png_with_ihdr(7, 5, kind=b"IHDX"),
        "d_blocks.gif": hostile.gif(7, 5, [b"\x21\xfe\x00"] * 20_001 + [hostile.gif_frame(7, 5)]),
        "e_webp.png": b"RIFF\x24\0\0\0WEBPVP8 \x18\0\0\0" + b"\0" * 24,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    shutil.copy(exported.files[1], folder / "a.jpg")
    reasons = {
        "b_ihdr_length.png": "corrupt or truncated PNG header (no 13-byte IHDR chunk after the "
                             "signature; ",
        "c_ihdr_type.png": "corrupt or truncated PNG header (no 13-byte IHDR chunk after the "
                           "signature; ",
        "d_blocks.gif": "GIF of more than 20000 blocks (extensions and frames); refused before "
                        "decoding",
        "e_webp.png": "not a JPEG, PNG, GIF or BMP file (44 bytes); refused before decoding",
    }
    assert predict.main([str(exported.result.path), str(folder)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m training.predict: skipped 4 file(s) it cannot classify: ")
    assert "cannot decode" not in err, err
    for name, reason in reasons.items():
        assert f"{folder / name} ({reason}" in err, (name, err)
    for name, reason in reasons.items():  # one file: the error line names the fault
        assert predict.main(["--rest-request", "serving_default", str(folder / name)]) == 2
        assert capsys.readouterr().err.strip().startswith(
            f"python -m training.predict: error: image {folder / name}: {reason}")
        with pytest.raises(predict.PredictError, match=re.escape(f"{folder / name}: {reason}")):
            predict.classify_files(exported.result.path, [folder / name])


def test_client_refuses_bombs_before_decoding_in_one_line(exported, tmp_path, capsys):  # noqa: F811
    """A bomb among good files: one line naming the file, its size and the export's limit (read
    from its export.json), for the local export and for the pixel REST body (decoded here)."""
    bomb = tmp_path / "photos" / "b_bomb.png"
    bomb.parent.mkdir()
    bomb.write_bytes(hostile.png_of_zeros(20000, 20000))
    shutil.copy(exported.files[1], tmp_path / "photos" / "a.jpg")
    assert predict.max_image_pixels_of(exported.result.path) == 100_000_000
    size = ("20000 x 20000 pixels x 1 frame = 400000000 pixels, over the limit of 100000000 "
            "pixels (max_image_pixels); refused before decoding")
    assert predict.main([str(exported.result.path), str(bomb.parent)]) == 1  # a.jpg classified
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"python -m training.predict: skipped 1 file(s) it cannot "
                                    f"classify: {bomb} ({size})")
    assert captured.out.startswith(f"{bomb.parent / 'a.jpg'}: ")
    assert predict.main(["--rest-request", "serving_default", str(bomb)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"python -m training.predict: error: image {bomb}: {size}"
    assert captured.out == ""
    # The export's own limit applies: an export made with a lower one refuses sooner.
    low = tmp_path / "low"
    shutil.copytree(exported.result.path, low)
    info = json.loads((low / "assets.extra" / "export.json").read_text())
    (low / "assets.extra" / "export.json").write_text(json.dumps({**info, "max_image_pixels": 1000}))
    assert predict.main([str(low), str(exported.files[1])]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "32 x 32 pixels x 1 frame = 1024 pixels, over the limit of 1000 pixels "
        "(max_image_pixels); refused before decoding)")
    probabilities = predict.classify_files(low, exported.files[:2], max_image_pixels=1024)
    np.testing.assert_allclose(probabilities, exported.expected[:2], atol=1e-5)


def _decode_rest_body(body, loaded):
    """Decodes a REST :predict body as TF Serving does (row format) and runs the signature."""
    signature = loaded.signatures[body.get("signature_name", "serving_default")]
    (input_name, spec), = signature.structured_input_signature[1].items()
    instances = body["instances"]
    if spec.dtype == tf.string:
        values = [base64.b64decode(x["b64"]) for x in instances]
    else:
        values = np.array(instances, dtype=spec.dtype.as_numpy_dtype)
    return {k: v.numpy() for k, v in signature(**{input_name: tf.constant(values)}).items()}


def _serving_guide():
    return SERVING_GUIDE.read_text()


def test_serving_guide_rest_request_bodies_are_valid_inputs(exported, tmp_path, capsys):  # noqa: F811
    section = _serving_guide()
    image = exported.files[3]
    want = exported.expected[3]
    loaded = tf.saved_model.load(str(exported.result.path))
    # 1. The pure-shell body (printf + base64) for serving_bytes.
    shell_lines = [line for line in section.splitlines() if line.startswith("printf '{")]
    assert len(shell_lines) == 1, shell_lines
    command = shell_lines[0].replace(GUIDE_IMAGE, str(image))
    command = re.sub(r"> \S+$", f"> {tmp_path / 'request.json'}", command)
    subprocess.run(["bash", "-c", command], check=True, timeout=60)
    bodies = [json.loads((tmp_path / "request.json").read_text())]
    # 2. The bodies written by `python -m training.predict --rest-request ...` (both signatures).
    client_lines = [line for line in section.splitlines()
                    if line.startswith("python -m training.predict --rest-request")]
    assert {shlex.split(line)[4] for line in client_lines} == {"serving_bytes", "serving_default"}
    for line in client_lines:
        argv = shlex.split(line.split(">")[0])[3:]
        argv = [str(image) if a == GUIDE_IMAGE else a for a in argv]
        assert predict.main(argv) == 0
        bodies.append(json.loads(capsys.readouterr().out))
    for body in bodies:
        outputs = _decode_rest_body(body, loaded)
        np.testing.assert_allclose(outputs["probabilities"][0], want, atol=1e-5)
        assert outputs["class_names"][0].decode() == CLASSES[want.argmax()]
    # The curl commands post these files to both signatures' :predict endpoint.
    assert section.count("curl -s -X POST http://localhost:8501/v1/models/revnet38:predict") >= 2


class _FakeTFServing(http.server.BaseHTTPRequestHandler):
    """Answers `POST /v1/models/<name>:predict` like TF Serving's REST API (row format)."""

    loaded = None

    def do_POST(self):  # noqa: N802 (http.server's naming)
        if not re.fullmatch(r"/v1/models/tiny(/versions/\d+)?:predict", self.path):
            self.send_error(404)
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        outputs = _decode_rest_body(body, self.loaded)
        rows = [{k: (v[i].decode() if isinstance(v[i], bytes) else v[i].tolist())
                 for k, v in outputs.items()} for i in range(len(body["instances"]))]
        data = json.dumps({"predictions": rows}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_rest_client_against_a_server_speaking_tf_serving_rest(exported, capsys):  # noqa: F811
    _FakeTFServing.loaded = tf.saved_model.load(str(exported.result.path))
    server = http.server.HTTPServer(("127.0.0.1", 0), _FakeTFServing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1/models/tiny/versions/1"
        files = exported.files[:5]
        assert predict.main(["--server", url, *map(str, files), "--top", "2"]) == 0
    finally:
        server.shutdown()
        thread.join()
    parsed = _parse_output(capsys.readouterr().out)
    assert list(parsed) == list(map(str, files))
    for (path, top), want in zip(parsed.items(), exported.expected):
        ids = np.argsort(-want)[:2]
        assert top[0][0] == CLASSES[ids[0]]  # the top class by name (class_names output)
        assert top[1][0] == f"#{ids[1]}"  # <= 10 classes: no top_k outputs, the others by id
        np.testing.assert_allclose([p for _, p in top], want[ids], atol=6e-4)


def test_serving_guide_grpc_client_against_a_prediction_service(exported, capsys):  # noqa: F811
    """Runs docs/serving.md's gRPC snippet against a `PredictionService` (tensorflow-serving-api's own
    stub and servicer) that answers from the loaded SavedModel."""
    from concurrent import futures

    grpc = pytest.importorskip("grpc")
    apis = pytest.importorskip("tensorflow_serving.apis.prediction_service_pb2_grpc")
    from tensorflow_serving.apis import predict_pb2

    loaded = tf.saved_model.load(str(exported.result.path))

    class Service(apis.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 (gRPC's naming)
            assert request.model_spec.name == "revnet38"
            signature = loaded.signatures[request.model_spec.signature_name or "serving_default"]
            inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
            response = predict_pb2.PredictResponse()
            for key, value in signature(**inputs).items():
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    apis.add_PredictionServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        blocks = re.findall(r"```python\n(.*?)```", _serving_guide(), re.S)
        snippet, = [b for b in blocks if "prediction_service_pb2_grpc" in b]
        image = exported.files[5]
        snippet = snippet.replace("localhost:8500", f"127.0.0.1:{port}").replace(
            GUIDE_IMAGE, str(image))
        exec(compile(snippet, "docs/serving.md", "exec"), {})
    finally:
        server.stop(None)
    printed = capsys.readouterr().out.strip()
    assert printed == str(np.array([CLASSES[exported.expected[5].argmax()].encode()]))


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_serving_guide_python_examples_run(exported, capsys):  # noqa: F811
    """docs/serving.md's SavedModel and TFLite snippets, with its paths pointed at the test export."""
    blocks = re.findall(r"```python\n(.*?)```", _serving_guide(), re.S)
    replacements = {
        "saved_models/revnet38/1": str(exported.result.path),
        "saved_models/revnet38/4/model.tflite": str(exported.result.tflite_path),
        GUIDE_IMAGE: str(exported.files[3]),  # files[i] is of class i for i < 10: 3 = cat
        "/tmp/cifar10/test/ship/0000.jpg": str(exported.files[8]),
    }
    saved_model_block, = [b for b in blocks if 'signatures["serving_bytes"]' in b]
    tflite_block, = [b for b in blocks if "tf.lite.Interpreter" in b]
    for block in (saved_model_block, tflite_block):
        for old, new in replacements.items():
            block = block.replace(old, new)
        exec(compile(block, "docs/serving.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    names = [CLASSES[i] for i in exported.expected.argmax(axis=1)]
    assert lines[0].startswith(str(np.array([names[3].encode(), names[8].encode()], dtype=object)))
    np.testing.assert_allclose(
        np.array(lines[0].split("] [")[1].rstrip("]").split(), dtype=float),
        exported.expected[[3, 8]].max(axis=1), rtol=1e-5)
    assert lines[1] == str(np.array([names[3].encode()], dtype=object))
