"""Server settings (one frozen object, built by `patchcore serve` or by tests) and the bearer token."""
from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import InputError

TOKEN_ENV = "PATCHCORE_TOKEN"


@dataclass(frozen=True)
class ServerSettings:
    models_dir: Path  # every *.model in it is served, by file stem
    review_dir: Path  # SQLite review store and the images inspectors gave feedback on
    host: str = "127.0.0.1"
    token: str | None = None  # bearer token for state-changing endpoints (and predict off loopback)
    open_predict: bool = False  # off loopback, let predict through without the token
    device: str = "auto"
    runtime: str = "torch"  # "onnx": score through each model's export, MODEL.onnx/ (docs/RUNTIME.md)
    max_batch: int = 8  # B: images per predict_batch call
    max_wait_ms: float = 10.0  # T: how long the first image of a batch waits for company
    max_queue: int = 32  # admitted predict requests (decoding, queued or computing); beyond: 503
    max_upload_bytes: int = 20 << 20
    max_pixels: int = 40_000_000
    # Model-input pixels of one upload (after the model's resize and crop): what the backbone, the features
    # and the maps of one request cost (measured on CPU: ~250 B per pixel for EfficientNet-Lite0, ~330 for
    # WideResNet-50), so one request takes at most ~1.3 GB beyond its decoded image (3 B per pixel).
    max_input_pixels: int = 4_000_000
    recent_results: int = 256  # uploads kept in memory so feedback can refer to them by result_id
    recent_bytes: int = 256 << 20

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_upload_bytes", "max_pixels", "max_input_pixels",
                     "recent_results", "recent_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"server setting {name} must be a whole number >= 1, got {value!r}")
        if not (isinstance(self.max_wait_ms, (int, float)) and math.isfinite(self.max_wait_ms)
                and self.max_wait_ms >= 0):
            raise InputError(f"server setting max_wait_ms must be a finite number >= 0, got {self.max_wait_ms!r}")

    @property
    def predict_needs_token(self) -> bool:
        return not is_loopback(self.host) and not self.open_predict


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | Path | None) -> str | None:
    """The token from --token-file (first line, stripped) or else $PATCHCORE_TOKEN; None if neither."""
    if token_file is not None:
        path = Path(token_file)
        if path.exists() and not path.is_file():  # a named pipe would hang the start-up
            raise InputError(f"{path}: the token file is not a regular file")
        try:
            lines = path.read_text().strip().splitlines()
        except OSError as err:
            raise InputError(f"{path}: cannot read the token file ({err.strerror})") from None
        token = lines[0].strip() if lines else ""
        if len(token) < 16:
            raise InputError(f"{path}: the token must be at least 16 characters")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token and len(token) < 16:
        raise InputError(f"${TOKEN_ENV}: the token must be at least 16 characters")
    return token or None
