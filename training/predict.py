"""Classify image files with an exported SavedModel, locally or through TF Serving's REST API.

A client needs only TensorFlow (for a local SavedModel) or nothing but the standard library (for a
TF Serving server): this file imports neither `tf_revnet` nor the rest of `training/` except
`training/image_safety.py` (TensorFlow only), so the two can be copied together (beside each other,
`import image_safety` is found). Before decoding or sending a file to a local export, its size is
read from its header and a file over the export's `max_image_pixels` (its `export.json`; 100
million pixels by default) is refused with one line naming the file, its size and the limit.
Run as `python -m training.predict`, it imports TensorFlow (only when it needs it) without
TensorFlow's start-up lines and libjpeg's warnings on stderr, through `training/startup.py` (a copy
of this file without that module prints them). The images are sent as encoded files to
the `serving_bytes` signature, which decodes, resizes and normalizes them inside the model and
returns the class names.

    # Local SavedModel (a model base path picks its highest version):
    python -m training.predict saved_models/revnet38 /tmp/cifar10/test/cat/0000.jpg photos/
    # A TF Serving server (REST port 8501):
    python -m training.predict --server http://localhost:8501/v1/models/revnet38 cat.jpg
    # The JSON body of a REST :predict request, for curl:
    python -m training.predict --rest-request serving_bytes cat.jpg > request.json

Output, one line per image: `path: name probability, name probability, ...` (top classes first).
With a local export, files it cannot classify (refused from their header, or not decoding) are
skipped, the others classified, and the skipped ones listed in one line on stderr (exit status 1;
2 when none could be classified). Folders are searched without following folder links (so a link
loop is read once).

Example:

```python
export_dir = predict.resolve_export_dir("saved_models/revnet38")        # .../<highest version>
probabilities = predict.classify_files(export_dir, ["cat.jpg"])          # float32 (1, classes)
predict.decode_predictions(probabilities, predict.read_class_names(export_dir), top=3)
# [[(3, 'cat', 0.65), (5, 'dog', 0.2), (2, 'bird', 0.05)]]
```
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import pathlib
import sys
import urllib.error
import urllib.request

__all__ = ["IMAGE_EXTENSIONS", "PredictError", "build_parser", "run", "resolve_export_dir",
           "max_image_pixels_of", "read_class_names", "decode_predictions", "list_images",
           "classify_files", "classify_readable", "rest_request_body", "classify_with_server",
           "main"]

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
CLASS_NAMES_FILE = "assets.extra/class_names.txt"
EXPORT_INFO_FILE = "assets.extra/export.json"
BYTES_SIGNATURE = "serving_bytes"
PIXEL_SIGNATURE = "serving_default"


class PredictError(ValueError):
    """Bad input to the client; the message is one line naming the argument and the fix."""


_COMMAND_LINE = False  # True when run as `python -m training.predict` (set at the end of the file)


def _startup():
    """`training.startup` when running as the command line and it is importable, else None."""
    if not _COMMAND_LINE:
        return None
    try:
        from training import startup
    except ImportError:  # this file copied on its own: TensorFlow's own stderr lines stay
        return None
    return startup


def _tensorflow():
    """Imports TensorFlow; on the command line without its start-up noise (absl, CUDA stubs)."""
    startup = _startup()
    if startup is not None:
        return startup.import_tensorflow_quietly()
    import tensorflow as tf

    return tf


def _quiet_decoding():
    """On the command line, drops libjpeg's stderr lines ("Corrupt JPEG data", ...) while decoding
    (the one-line error names the file instead); elsewhere, leaves stderr alone."""
    startup = _startup()
    return startup.quiet_stderr() if startup is not None else contextlib.nullcontext()


def _image_safety():
    """`training.image_safety`, or `image_safety` beside a copy of this file (it imports
    TensorFlow: imported quietly first, on the command line)."""
    _tensorflow()
    try:
        from training import image_safety
    except ImportError:
        import image_safety
    return image_safety


def _checked_bytes(path, max_pixels):
    """The bytes of image file `path`, after its header passed `image_safety.check_image`."""
    tf = _tensorflow()
    image_safety = _image_safety()
    contents = pathlib.Path(path).read_bytes()
    try:
        image_safety.check_image(contents, max_pixels, name=str(path))
    except tf.errors.InvalidArgumentError as e:
        reason = image_safety.refusal_reason(e)
        if reason:  # "PATH: <size> over the limit ...", "PATH: corrupt PNG header ...", ...
            raise PredictError(f"image {reason}") from None
        raise PredictError(f"image {path}: cannot decode it (not a JPEG, PNG, GIF or BMP file, "
                           "or truncated)") from None
    return contents


def _decode_file(path, max_pixels):
    """uint8 `(H, W, 3)` pixels of image file `path`, checked before decoding."""
    tf = _tensorflow()
    contents = _checked_bytes(path, max_pixels)
    try:
        with _quiet_decoding():
            return _image_safety().decode_image(contents, max_pixels, channels=3,
                                                name=str(path)).numpy()
    except tf.errors.InvalidArgumentError:
        raise PredictError(f"image {path}: cannot decode it (not a JPEG, PNG, GIF or BMP file, "
                           "or truncated)") from None


def max_image_pixels_of(export_dir):
    """The pixel budget of an export's `serving_bytes` (its `export.json`), or the default.

    Args:
        export_dir: str or path-like. A version directory.

    Returns:
        int: `max_image_pixels` of `assets.extra/export.json`, or
        `image_safety.DEFAULT_MAX_IMAGE_PIXELS` for exports that do not record it.
    """
    path = pathlib.Path(export_dir, EXPORT_INFO_FILE)
    try:
        value = json.loads(path.read_text()).get("max_image_pixels")
    except (OSError, ValueError, AttributeError):
        value = None
    return value if isinstance(value, int) and value > 0 else \
        _image_safety().DEFAULT_MAX_IMAGE_PIXELS


def resolve_export_dir(path):
    """Returns the SavedModel directory for a version directory or a model base path.

    Args:
        path: str or path-like. `saved_models/revnet38/3` (a version) or `saved_models/revnet38`
            (a base path: its highest integer version, the one TF Serving serves).

    Returns:
        `pathlib.Path` of a directory holding `saved_model.pb`.

    Raises:
        PredictError: if `path` is neither.
    """
    path = pathlib.Path(path)
    if (path / "saved_model.pb").is_file():
        return path
    versions = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit() and p.is_dir()),
                      reverse=True) if path.is_dir() else []
    for version in versions:
        if (path / str(version) / "saved_model.pb").is_file():
            return path / str(version)
    raise PredictError(f"export {path}: neither a SavedModel nor a model base path with numbered "
                       "versions; export one with python -m training.export")


def read_class_names(export_dir):
    """Returns the label names stored with an export (`assets.extra/class_names.txt`).

    Args:
        export_dir: str or path-like. A version directory written by `python -m training.export`.

    Returns:
        list of str, index = class id.
    """
    return pathlib.Path(export_dir, CLASS_NAMES_FILE).read_text().splitlines()


def decode_predictions(probabilities, class_names, top=5):
    """Turns class probabilities into the top classes, like `keras.applications` `decode_predictions`.

    Args:
        probabilities: array-like `(N, classes)` float (the `probabilities` output).
        class_names: sequence of `classes` str (e.g. `read_class_names(export_dir)`).
        top: int. Number of classes per image. Defaults to 5 (fewer if there are fewer classes).

    Returns:
        list of `N` lists of `(class_id, class_name, probability)` tuples, most probable first.

    Raises:
        ValueError: if `probabilities` is not `(N, len(class_names))`.
    """
    rows = [list(map(float, row)) for row in probabilities]
    if any(len(row) != len(class_names) for row in rows):
        raise ValueError(f"`probabilities` must have shape (N, {len(class_names)}) to match "
                         "`class_names`")
    decoded = []
    for row in rows:
        order = sorted(range(len(row)), key=lambda i: -row[i])[:top]
        decoded.append([(i, class_names[i], row[i]) for i in order])
    return decoded


def list_images(paths):
    """Expands files and folders (searched recursively) into a sorted list of image files.

    Args:
        paths: sequence of str or path-like.

    Returns:
        list of `pathlib.Path`: the files given, then each folder's images (by extension
        `IMAGE_EXTENSIONS`) in sorted order; folder links inside a folder are not followed.

    Raises:
        PredictError: a path does not exist, or nothing was found.
    """
    files = []
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*")
                            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise PredictError(f"image {path}: no such file or folder")
    if not files:
        raise PredictError(f"images {' '.join(map(str, paths))}: no image files "
                           f"({', '.join(IMAGE_EXTENSIONS)}) found")
    return files


def classify_files(export_dir, files, batch_size=64, max_image_pixels=None):
    """Runs the `serving_bytes` signature of a local SavedModel on encoded image files.

    Each file's header is checked first (`image_safety.check_image`): nothing over the pixel
    budget is decoded, here or in the export.

    Args:
        export_dir: str or path-like. A version directory (see `resolve_export_dir`).
        files: sequence of paths of JPEG, PNG, GIF or BMP files of any size.
        batch_size: int. Images per call.
        max_image_pixels: int or None. Refuse files whose header announces more pixels (all
            frames of a GIF together). Default: the export's (`max_image_pixels_of`).

    Returns:
        numpy float32 array `(len(files), classes)` of probabilities.

    Raises:
        PredictError: a file is refused (names the file, its size and the limit) or cannot be
            decoded (names the file).
    """
    import numpy as np

    tf = _tensorflow()
    if max_image_pixels is None:
        max_image_pixels = max_image_pixels_of(export_dir)
    serve = tf.saved_model.load(str(export_dir)).signatures[BYTES_SIGNATURE]
    batches = []
    with _quiet_decoding():
        for start in range(0, len(files), batch_size):
            batch = files[start:start + batch_size]
            data = [_checked_bytes(f, max_image_pixels) for f in batch]
            try:
                batches.append(serve(image_bytes=tf.constant(data))["probabilities"].numpy())
            except tf.errors.InvalidArgumentError:
                for f in batch:  # find the culprit for a one-line message (checked: safe)
                    _decode_file(f, max_image_pixels)
                raise
    return np.concatenate(batches)


def classify_readable(export_dir, files, batch_size=64, max_image_pixels=None):
    """Like `classify_files`, but skips the files it cannot classify instead of stopping.

    A file is skipped when its header is refused (over `max_image_pixels`, not a JPEG, PNG, GIF
    or BMP, corrupt) or when it does not decode (truncated data after a valid header).

    Returns:
        `(classified, probabilities, skipped)`: the files classified (in order), numpy float32
        `(len(classified), classes)`, and a list of `(path, reason)` for the others.
    """
    import numpy as np

    tf = _tensorflow()
    if max_image_pixels is None:
        max_image_pixels = max_image_pixels_of(export_dir)
    serve = tf.saved_model.load(str(export_dir)).signatures[BYTES_SIGNATURE]
    readable, skipped = [], []
    for f in files:
        try:
            readable.append((f, _checked_bytes(f, max_image_pixels)))
        except PredictError as e:
            skipped.append((f, str(e).split(": ", 1)[-1]))
    classified, rows = [], []
    with _quiet_decoding():
        for start in range(0, len(readable), batch_size):
            batch = readable[start:start + batch_size]
            try:
                rows.append(serve(image_bytes=tf.constant([b for _, b in batch]))["probabilities"])
                classified += [f for f, _ in batch]
                continue
            except tf.errors.InvalidArgumentError:
                pass
            for f, contents in batch:  # one at a time, to skip only the files that fail
                try:
                    rows.append(serve(image_bytes=tf.constant([contents]))["probabilities"])
                    classified.append(f)
                except tf.errors.InvalidArgumentError:
                    skipped.append((f, "cannot decode it (not a JPEG, PNG, GIF or BMP file, or "
                                       "truncated)"))
    position = {f: i for i, f in enumerate(files)}
    skipped.sort(key=lambda item: position[item[0]])  # in the order given
    probabilities = (np.concatenate([r.numpy() for r in rows]) if rows
                     else np.zeros((0, len(read_class_names(export_dir))), np.float32))
    return classified, probabilities, skipped


def _skipped_line(skipped, shown=5):
    listed = "; ".join(f"{path} ({reason})" for path, reason in skipped[:shown])
    more = f"; ... ({len(skipped) - shown} more)" if len(skipped) > shown else ""
    return f"skipped {len(skipped)} file(s) it cannot classify: {listed}{more}"


def rest_request_body(files, signature=BYTES_SIGNATURE):
    """The JSON body of a TF Serving REST `:predict` request (row format, `instances`).

    Args:
        files: sequence of image file paths.
        signature: `"serving_bytes"` (the encoded files, base64 in `{"b64": ...}` objects: any
            size or format) or `"serving_default"` (decoded uint8 pixels as nested lists: the files
            must already have the model's image size; needs TensorFlow to decode them).

    Returns:
        dict, e.g. `{"signature_name": "serving_bytes", "instances": [{"b64": "/9j/4AAQ..."}]}`.

    Raises:
        PredictError: unknown `signature`; for `"serving_default"`, a file over
            `image_safety.DEFAULT_MAX_IMAGE_PIXELS` (checked before decoding) or that does not
            decode.
    """
    if signature == BYTES_SIGNATURE:
        instances = [{"b64": base64.b64encode(pathlib.Path(f).read_bytes()).decode("ascii")}
                     for f in files]
    elif signature == PIXEL_SIGNATURE:
        max_pixels = _image_safety().DEFAULT_MAX_IMAGE_PIXELS
        instances = [_decode_file(f, max_pixels).tolist() for f in files]
    else:
        raise PredictError(f"--rest-request {signature}: choose {BYTES_SIGNATURE} or "
                           f"{PIXEL_SIGNATURE}")
    return {"signature_name": signature, "instances": instances}


def classify_with_server(server_url, files, timeout=60):
    """Sends the files to a TF Serving REST endpoint (`serving_bytes`) and returns its predictions.

    Args:
        server_url: str. The model's URL, e.g. `http://localhost:8501/v1/models/revnet38` (add
            `/versions/3` to ask for one version); `:predict` is appended.
        files: sequence of image file paths.
        timeout: float. Seconds to wait for the answer.

    Returns:
        list of dicts, one per file, with the signature's outputs (`probabilities`, `class_ids`,
        `class_names`, and `top_k_*` for models with more than 10 classes).
    """
    body = json.dumps(rest_request_body(files, BYTES_SIGNATURE)).encode()
    request = urllib.request.Request(server_url.rstrip("/") + ":predict", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())["predictions"]
    except urllib.error.HTTPError as e:  # TF Serving answers errors as {"error": "..."}
        message = e.read().decode(errors="replace")
        try:
            message = json.loads(message)["error"]
        except (ValueError, KeyError, TypeError):
            pass
        raise PredictError(f"--server {server_url}: HTTP {e.code}: "
                           f"{' '.join(str(message).split())[:300]}") from None
    except urllib.error.URLError as e:
        raise PredictError(f"--server {server_url}: cannot reach it ({e.reason}); is TF Serving "
                           "running with --rest_api_port?") from None


def _format(path, top_classes):
    return f"{path}: " + ", ".join(f"{name} {p:.3f}" for _, name, p in top_classes)


def build_parser():
    """The command-line interface of `python -m training.predict`."""
    parser = argparse.ArgumentParser(
        prog="python -m training.predict",
        description="Classify image files (JPEG, PNG, GIF, BMP; folders are searched) with an "
        "exported SavedModel or a TF Serving server; prints the top classes and probabilities.",
        epilog="Example: python -m training.predict saved_models/revnet38 /tmp/cifar10/test/cat",
    )
    parser.add_argument("export", nargs="?",
                        help="SavedModel version directory, or model base path (highest version). "
                             "Not needed with --server or --rest-request")
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--top", type=int, default=3, help="classes shown per image. Default: 3")
    parser.add_argument("--batch-size", type=int, default=64, help="images per call. Default: 64")
    parser.add_argument("--server", default=None,
                        help="TF Serving REST model URL, e.g. "
                             "http://localhost:8501/v1/models/revnet38, instead of a local export")
    parser.add_argument("--rest-request", default=None, choices=(BYTES_SIGNATURE, PIXEL_SIGNATURE),
                        help="print the JSON body of a REST :predict request for this signature "
                             "and exit")
    return parser


def run(argv=None):
    """Parses `argv`, classifies, prints one line per image. Returns the decoded predictions."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.server is None and args.rest_request is None:
        if args.export is None:
            parser.error("the export (or --server) is required")
    elif args.export is not None:
        args.images.insert(0, args.export)  # the first positional was an image
    if args.top < 1:
        raise PredictError(f"--top must be >= 1. Received: {args.top}")
    if args.batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1. Received: {args.batch_size}")
    files, skipped = list_images(args.images), []
    if args.rest_request is not None:
        print(json.dumps(rest_request_body(files, args.rest_request)))
        return None
    if args.server is not None:
        predictions = classify_with_server(args.server, files)
        results = []
        for row in predictions:
            if "top_k_class_names" in row:
                results.append(list(zip(row["top_k_class_ids"], row["top_k_class_names"],
                                        row["top_k_probabilities"]))[:args.top])
            else:  # up to 10 classes: the top class by name, the others by id
                order = sorted(range(len(row["probabilities"])),
                               key=lambda i: -row["probabilities"][i])[:args.top]
                results.append([(i, row["class_names"] if i == row["class_ids"] else f"#{i}",
                                 row["probabilities"][i]) for i in order])
    else:
        export_dir = resolve_export_dir(args.export)
        files, probabilities, skipped = classify_readable(export_dir, files, args.batch_size)
        if not files:
            raise PredictError(_skipped_line(skipped).replace("skipped", "no image to classify; "
                                                              "skipped", 1))
        results = decode_predictions(probabilities, read_class_names(export_dir), top=args.top)
    for path, top_classes in zip(files, results):
        print(_format(path, top_classes))
    if skipped:
        print(f"python -m training.predict: {_skipped_line(skipped)}", file=sys.stderr)
        raise _Partial()
    return results


class _Partial(Exception):
    """Some files were classified and printed, others skipped (listed on stderr): exit 1."""


def main(argv=None):
    """Command-line entry point. Returns 0; 1 when it classified some files and skipped others
    (listed in one line on stderr); 2 after a one-line error (nothing classified)."""
    try:
        run(argv)
    except PredictError as e:
        print(f"python -m training.predict: error: {e}", file=sys.stderr)
        return 2
    except _Partial:
        return 1
    return 0


if __name__ == "__main__":
    _COMMAND_LINE = True
    sys.exit(main())
