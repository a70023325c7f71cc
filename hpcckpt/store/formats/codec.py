"""The safe encoding of a checkpoint's values other than tensor data: JSON plus a few tags.

Invariant: decoding never runs code from the file and never allocates more than the file holds. Plain JSON
carries None, bool, str, lists, finite floats (``-0.0`` included), ints below 2**63 and dicts whose keys are
strings not starting with ``$``. Everything else is an object with exactly one ``$`` key (a tag):
``$int`` (hex), ``$float`` (nan, inf, -inf), ``$tuple``, ``$dict`` (any keys, as pairs), ``$odict``
(an ``OrderedDict`` and its ``_metadata``, as ``Module.state_dict()`` returns), ``$bytes`` (base64),
``$dtype``, ``$device``, ``$size``, ``$npscalar``, and the references the container resolves: ``$tensor``,
``$param``, ``$ndarray`` and ``$pickle``. A value of none of these kinds (a user ``Stateful``'s own object) is
pickled alone by ``torch.save`` into a blob (``$pickle``), which decoding loads with
``torch.load(weights_only=True)`` unless the caller allows full pickle by name (issue 13: never full pickle
unless ``unsafe_allow_pickle=True``). An unknown tag, a bad value or nesting deeper than :data:`MAX_DEPTH`
raises :class:`CodecError`; the container turns it into a :class:`CorruptCheckpointError` naming its file.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

MAX_DEPTH = 64
_BIG = 1 << 63
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# NumPy dtypes kept as raw bytes (``dtype.str``); others (objects, strings, records) are pickled.
NUMPY_DTYPES = frozenset(
    ["|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8", "<c8", "<c16"]
)


class CodecError(ValueError):
    """A value cannot be encoded or decoded; ``path`` is where in the state (e.g. ``['optimizer']['state']``)."""

    def __init__(self, reason: str, path: str = "") -> None:
        super().__init__(reason, path)
        self.reason, self.path = reason, path

    def __str__(self) -> str:
        return f"at {self.path or 'the top level'}: {self.reason}"

    def inside(self, key: Any) -> CodecError:
        return CodecError(self.reason, f"[{key!r}]{self.path}")


class Encoder:
    """Turns a state into JSON-able values; tensors, arrays and pickled blobs go to the callbacks, which
    answer the JSON that refers to them."""

    def __init__(
        self, tensor: Callable[[Any], Any], raw: Callable[[memoryview], int], dtype_name: Callable[[Any], str]
    ) -> None:
        import torch

        self._torch = torch
        self._tensor, self._raw, self._dtype_name = tensor, raw, dtype_name

    def encode(self, value: Any, depth: int = 0) -> Any:
        kind = type(value)
        if value is None or kind is bool or kind is str:
            return value
        if kind is int:
            return value if -_BIG < value < _BIG else {"$int": hex(value)}
        if kind is float:
            return value if math.isfinite(value) else {"$float": repr(value)}
        if depth >= MAX_DEPTH:
            raise CodecError(f"nested deeper than {MAX_DEPTH} levels; flatten the state")
        if kind is dict or kind is OrderedDict:
            return self._mapping(value, depth)
        if kind is list:
            return [self._item(v, i, depth) for i, v in enumerate(value)]
        if kind is tuple:
            return {"$tuple": [self._item(v, i, depth) for i, v in enumerate(value)]}
        return self._other(value)

    def _item(self, value: Any, key: Any, depth: int) -> Any:
        try:
            return self.encode(value, depth + 1)
        except CodecError as error:
            raise error.inside(key) from None

    def _mapping(self, value: Mapping[Any, Any], depth: int) -> Any:
        if type(value) is dict and all(type(k) is str and not k.startswith("$") for k in value):
            return {k: self._item(v, k, depth) for k, v in value.items()}
        pairs = [[self.encode(k, depth + 1), self._item(v, k, depth)] for k, v in value.items()]
        if type(value) is dict:
            return {"$dict": pairs}
        metadata = getattr(value, "_metadata", None)
        return {"$odict": [pairs, self.encode(metadata, depth + 1) if type(metadata) is dict else None]}

    def _other(self, value: Any) -> Any:
        torch = self._torch
        if isinstance(value, torch.Tensor):
            ref = self._tensor(value)  # None: a tensor kept only by pickle (sparse, quantized, a subclass)
            if ref is not None:
                return ref
        elif isinstance(value, torch.dtype):
            return {"$dtype": self._dtype_name(value)}
        if isinstance(value, torch.device):
            return {"$device": str(value)}
        if type(value) is torch.Size:
            return {"$size": list(value)}
        if type(value) is bytes:
            return {"$bytes": base64.b64encode(value).decode()}
        numpy = _numpy_kind(value)
        if numpy == "array" and value.dtype.str in NUMPY_DTYPES and not value.dtype.hasobject:
            import numpy as np

            data = np.ascontiguousarray(value)
            index = self._raw(data.reshape(-1).view(np.uint8).data)
            return {"$ndarray": [index, value.dtype.str, list(value.shape)]}
        if numpy == "scalar" and value.dtype.str in NUMPY_DTYPES:
            return {"$npscalar": [value.dtype.str, base64.b64encode(value.tobytes()).decode()]}
        return {
            "$pickle": [self._raw(memoryview(_pickled(value))), f"{type(value).__module__}.{type(value).__qualname__}"]
        }


def _numpy_kind(value: Any) -> str | None:
    module = type(value).__module__
    if not module.startswith("numpy"):
        return None
    import numpy as np

    if isinstance(value, np.ndarray):
        return "array"
    return "scalar" if isinstance(value, np.generic) else None


def _pickled(value: Any) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


class Decoder:
    """The inverse of :class:`Encoder`; the callbacks resolve references into the container."""

    def __init__(
        self,
        tensor: Callable[[Any, bool | None], Any],
        raw: Callable[[int], memoryview],
        dtype: Callable[[str], Any],
        *,
        weights_only: bool,
    ) -> None:
        import torch

        self._torch = torch
        self._tensor, self._raw, self._dtype = tensor, raw, dtype
        self.weights_only = weights_only

    def decode(self, value: Any, depth: int = 0) -> Any:
        kind = type(value)
        if value is None or kind is bool or kind is str or kind is int or kind is float:
            return value
        if depth >= MAX_DEPTH:
            raise CodecError(f"nested deeper than {MAX_DEPTH} levels")
        if kind is list:
            return [self._item(v, i, depth) for i, v in enumerate(value)]
        if kind is not dict:
            raise CodecError(f"unexpected JSON value of type {kind.__name__}")
        if len(value) == 1:
            ((tag, body),) = value.items()
            if tag.startswith("$"):
                return self._tagged(tag, body, depth)
        return {k: self._item(v, k, depth) for k, v in value.items()}

    def _item(self, value: Any, key: Any, depth: int) -> Any:
        try:
            return self.decode(value, depth + 1)
        except CodecError as error:
            raise error.inside(key) from None

    def _tagged(self, tag: str, body: Any, depth: int) -> Any:
        handler = _TAGS.get(tag)
        if handler is None:
            raise CodecError(f"unknown tag {tag!r}; expected one of {sorted(_TAGS)}")
        try:
            return handler(self, body, depth)
        except CodecError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, OverflowError, binascii.Error) as error:
            raise CodecError(f"malformed {tag} value {_short(body)} ({type(error).__name__}: {error})") from None

    def _pairs(self, body: Any, depth: int) -> list[tuple[Any, Any]]:
        if type(body) is not list or not all(type(p) is list and len(p) == 2 for p in body):
            raise CodecError(f"expected a list of [key, value] pairs, got {_short(body)}")
        pairs = []
        for k, v in body:
            key = self.decode(k, depth + 1)
            try:
                hash(key)
            except TypeError:
                raise CodecError(f"unhashable key {_short(k)}") from None
            pairs.append((key, self._item(v, key, depth)))
        return pairs

    def _int(self, body: Any, depth: int) -> int:
        if type(body) is not str or len(body) > 4096:
            raise CodecError(f"expected a hex string of at most 4096 characters, got {_short(body)}")
        return int(body, 16)

    def _float(self, body: Any, depth: int) -> float:
        if body not in _FLOATS:
            raise CodecError(f"expected one of {sorted(_FLOATS)}, got {_short(body)}")
        return _FLOATS[body]

    def _tuple(self, body: Any, depth: int) -> tuple[Any, ...]:
        if type(body) is not list:
            raise CodecError(f"expected a list, got {_short(body)}")
        return tuple(self._item(v, i, depth) for i, v in enumerate(body))

    def _dict(self, body: Any, depth: int) -> dict[Any, Any]:
        return dict(self._pairs(body, depth))

    def _odict(self, body: Any, depth: int) -> OrderedDict[Any, Any]:
        pairs, metadata = body
        result: OrderedDict[Any, Any] = OrderedDict(self._pairs(pairs, depth))
        if metadata is not None:
            result._metadata = self.decode(metadata, depth + 1)  # type: ignore[attr-defined]
        return result

    def _bytes(self, body: Any, depth: int) -> bytes:
        if type(body) is not str:
            raise CodecError(f"expected base64 text, got {_short(body)}")
        return base64.b64decode(body, validate=True)

    def _named_dtype(self, body: Any, depth: int) -> Any:
        return self._dtype(body)

    def _device(self, body: Any, depth: int) -> Any:
        if type(body) is not str or len(body) > 64:
            raise CodecError(f"expected a device name such as 'cpu' or 'cuda:0', got {_short(body)}")
        try:
            return self._torch.device(body)
        except RuntimeError:
            raise CodecError(f"invalid device name {_short(body)}") from None

    def _size(self, body: Any, depth: int) -> Any:
        if type(body) is not list or not all(type(n) is int and 0 <= n < _BIG for n in body) or len(body) > 64:
            raise CodecError(f"expected at most 64 whole numbers, got {_short(body)}")
        return self._torch.Size(body)

    def _npscalar(self, body: Any, depth: int) -> Any:
        import numpy as np

        name, data = body
        if name not in NUMPY_DTYPES:
            raise CodecError(f"NumPy dtype {_short(name)} is not one of {sorted(NUMPY_DTYPES)}")
        raw = self._bytes(data, depth)
        if len(raw) != np.dtype(name).itemsize:
            raise CodecError(f"a {name} scalar of {len(raw)} bytes")
        return np.frombuffer(raw, dtype=name)[0]

    def _ndarray(self, body: Any, depth: int) -> Any:
        import numpy as np

        index, name, shape = body
        if name not in NUMPY_DTYPES:
            raise CodecError(f"NumPy dtype {_short(name)} is not one of {sorted(NUMPY_DTYPES)}")
        if type(shape) is not list or len(shape) > 64 or not all(type(n) is int and 0 <= n < _BIG for n in shape):
            raise CodecError(f"bad shape {_short(shape)}")
        raw = self._raw(index)
        itemsize = np.dtype(name).itemsize
        if math.prod(shape) * itemsize != raw.nbytes:
            raise CodecError(
                f"shape {shape} of {name} needs {math.prod(shape) * itemsize} bytes, the data has {raw.nbytes}"
            )
        return np.frombuffer(raw, dtype=name).reshape(shape).copy()

    def _tensor_ref(self, body: Any, depth: int) -> Any:
        return self._tensor(body, None)

    def _param(self, body: Any, depth: int) -> Any:
        index, requires_grad = body
        if type(requires_grad) is not bool:
            raise CodecError(f"expected [index, true|false], got {_short(body)}")
        return self._tensor(index, requires_grad)

    def _pickle(self, body: Any, depth: int) -> Any:
        import io
        import pickle

        index, kind = body
        raw = self._raw(index)
        try:
            return self._torch.load(io.BytesIO(raw), map_location="cpu", weights_only=self.weights_only)
        except pickle.UnpicklingError as error:
            if not self.weights_only:
                raise CodecError(f"cannot unpickle a {kind!s:.80}: {error}") from None
            refused = next((ln.strip() for ln in str(error).splitlines() if "Unsupported global" in ln), "")
            raise PickleRefusedError(
                f"a {kind!s:.80} that torch.load(weights_only=True) refuses ({refused or 'arbitrary objects'}). "
                "Load it with unsafe_allow_pickle=True only if you trust who wrote it: unpickling runs code"
            ) from None
        except Exception as error:
            raise CodecError(f"cannot load the pickled {kind!s:.80}: {type(error).__name__}: {error}") from None


class PickleRefusedError(CodecError):
    """A pickled value that the weights-only allow-list refuses: the file is sound, the caller must decide."""

    def inside(self, key: Any) -> CodecError:
        return PickleRefusedError(self.reason, f"[{key!r}]{self.path}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TAGS: dict[str, Callable[[Decoder, Any, int], Any]] = {
    "$int": Decoder._int,
    "$float": Decoder._float,
    "$tuple": Decoder._tuple,
    "$dict": Decoder._dict,
    "$odict": Decoder._odict,
    "$bytes": Decoder._bytes,
    "$dtype": Decoder._named_dtype,
    "$device": Decoder._device,
    "$size": Decoder._size,
    "$npscalar": Decoder._npscalar,
    "$ndarray": Decoder._ndarray,
    "$tensor": Decoder._tensor_ref,
    "$param": Decoder._param,
    "$pickle": Decoder._pickle,
}
