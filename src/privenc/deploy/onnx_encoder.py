"""An exported ONNX encoder run by onnxruntime behind the interface of the PyTorch encoder, so
that verification, the grid and the audit can attack the very file that is deployed.

``privenc export --format onnx`` writes the graph with input ``image`` (float32, NCHW), output
``encoding`` and a dynamic batch axis only: the spatial size is fixed at the contract's
``image_size``. Every view the attackers encode is made at that size (the evaluation and
training transforms crop to ``data.image_size``, and the multi-scale attacker's
:class:`~privenc.data.transforms.ScaledView` resamples to it before encoding), so a fixed size
costs no attack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from privenc.errors import CheckpointError, ConfigError


class OnnxEncoder(nn.Module):
    """An onnxruntime session (CPU) called like :class:`~privenc.models.Encoder`: float32
    (B, C, S, S) in, the encoding (B, C', H', W') out as a torch tensor on the input's device.

    It has no parameters: the weights live in the session, which nothing in verification can
    change, so the probe pattern's frozen snapshot (:func:`privenc.encoders.freeze`) is empty.
    """

    def __init__(self, session: Any, path: Path, image_size: int, in_channels: int,
                 output_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.session, self.path = session, path
        self.image_size, self.in_channels, self.output_shape = image_size, in_channels, output_shape
        self.input_name = session.get_inputs()[0].name

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, image_size={self.image_size}, output_shape={self.output_shape}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            # onnxruntime's own message names graph nodes, not the image size that is wrong
            raise ValueError(f"{self.path} takes (batch, {', '.join(map(str, expected))}) images, got "
                             f"{tuple(x.shape)}")
        image = x.detach().to("cpu", torch.float32).contiguous().numpy()
        encoding = torch.from_numpy(self.session.run(None, {self.input_name: image})[0])
        if tuple(encoding.shape[1:]) != self.output_shape:  # a graph whose output size is symbolic
            raise CheckpointError(f"{self.path} gave encodings of shape {tuple(encoding.shape)}, but its input "
                                  f"contract says (batch, {', '.join(map(str, self.output_shape))}); export it "
                                  f"again with privenc export")
        return encoding.to(x.device)


def load_onnx(path: Path | str, contract: dict[str, Any]) -> OnnxEncoder:
    """Open an exported ``.onnx`` file with onnxruntime's CPU provider and check its graph
    against the input contract written beside it (``contract``): one input of shape
    (batch, C, S, S) with a dynamic batch axis, S the contract's ``image_size``, and the output
    shape the contract gives. A mismatch is a CheckpointError: the contract would make the
    attackers' images for another encoder."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"loading the ONNX export {path} needs the 'onnxruntime' package: "
                          f"pip install 'privenc[export]' (or give the .safetensors or .torchscript.pt export "
                          f"of the same encoder)") from None
    path = Path(path)
    try:
        size = int(contract["input"]["image_size"])
        channels, height, width = (int(dim) for dim in contract["output"]["shape"][1:])
        in_channels = int(contract["input"]["shape"][1])
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its input contract lacks a usable input or output shape "
                              f"({type(err).__name__}: {err}); export it again with privenc export") from None
    options = onnxruntime.SessionOptions()
    # As many threads as torch uses: an audit's worker processes each set theirs, and
    # onnxruntime's default (every core) would oversubscribe the machine.
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from Exception only
        raise CheckpointError(f"{path}: not a loadable ONNX file (truncated or corrupt?): {err}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) < 1:
        raise CheckpointError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; a privenc export has "
                              f"one of each (image -> encoding)")
    _check_shape(path, "input", inputs[0].shape, (in_channels, size, size))
    _check_shape(path, "output", outputs[0].shape, (channels, height, width))
    return OnnxEncoder(session, path, size, in_channels, (channels, height, width)).eval()


def _check_shape(path: Path, which: str, shape: list[Any], contract: tuple[int, int, int]) -> None:
    """The graph's declared ``shape`` against the contract's (C, H, W): the batch axis must be
    dynamic (verification encodes batches of any size), the others the contract's wherever the
    graph fixes them (a symbolic dimension is checked when the session runs)."""
    if len(shape) != 4:
        raise CheckpointError(f"{path}: its {which} has shape {shape}; a privenc export's is (batch, C, H, W)")
    if isinstance(shape[0], int):
        raise CheckpointError(f"{path}: its {which}'s batch axis is fixed at {shape[0]}; verification encodes "
                              f"batches of any size: export it again with privenc export (dynamic batch axis)")
    fixed = [(given, wanted) for given, wanted in zip(shape[1:], contract) if isinstance(given, int)]
    if any(given != wanted for given, wanted in fixed):
        raise CheckpointError(f"{path}: its {which} has shape {shape}, but its input contract says (batch, "
                              f"{', '.join(map(str, contract))}); the contract beside it is not this file's: "
                              f"export it again with privenc export")
