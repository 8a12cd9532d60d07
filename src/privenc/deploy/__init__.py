"""Deployment: run a trained encoder where the images are, and export it to run without privenc.

The encoder is meant to run before images are shared (Sec. 1 of the paper: only encodings
leave the device), so it must be usable away from the training code:

- :func:`encode` turns a folder or CSV list of images into sharded ``.npy`` encodings plus a
  manifest, resumably (finished shards are kept and skipped on a rerun);
- :func:`export` writes a standalone ONNX, TorchScript or safetensors encoder with its input
  contract in a JSON file beside it; :func:`load_onnx` runs an ONNX one in onnxruntime as a
  module, so that verification can attack the deployed file itself.

Both apply the encoder in eval mode: its per-location batch norms use their running
statistics, so an encoding is a fixed function of one image, independent of the batch it
was computed in. Images go through exactly the evaluation path of training
(:func:`~privenc.data.images.read_image`, :func:`~privenc.data.images.resize_square` to
``data.load_size``, :func:`~privenc.data.transforms.eval_transform`).

Output folder of ``encode`` (see docs/deploy.md):
    encode.json                  encoder sha256 + options; a rerun with others is refused
    shard-00000.npy              float32 [n, C, H, W], the readable images of shard 0, in order
    shard-00000.jsonl            manifest part of shard 0 (one line per input, errors included)
    manifest.jsonl               all parts concatenated, written once every shard is done
    previews/preview-00000.png   optional: rows of shard 0, histogram-equalized over the shard
"""

from privenc.deploy.contract import (
    CONTRACT_KEY,
    Deployable,
    contract_path,
    file_sha256,
    input_contract,
    load_safetensors,
    open_encoder,
)
from privenc.deploy.formats import EXPORT_SUFFIX, EXPORT_TOLERANCE, FORMATS, ONNX_OPSET, export
from privenc.deploy.onnx_encoder import OnnxEncoder, load_onnx
from privenc.deploy.shards import ENCODE_FILE, MANIFEST_FILE, PREVIEW_DIR, SHARD_DTYPE, encode, list_inputs

__all__ = [
    "CONTRACT_KEY", "Deployable", "ENCODE_FILE", "EXPORT_SUFFIX", "EXPORT_TOLERANCE", "FORMATS", "MANIFEST_FILE",
    "ONNX_OPSET", "OnnxEncoder", "PREVIEW_DIR", "SHARD_DTYPE", "contract_path", "encode", "export", "file_sha256",
    "input_contract", "list_inputs", "load_onnx", "load_safetensors", "open_encoder",
]
