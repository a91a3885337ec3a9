"""Volume output: VTK XML ImageData (.vti) for ParaView and PNG slice images, written atomically (util.files;
``.npy`` files: util.files.atomic_save_npy).

Axis convention (.vti)
----------------------
Fields are arrays of shape (D, H, W) (or (H, W)) in C order, the last axis fastest (design.md). VTK XML point
data is stored x fastest, then y, then z, so the C-order bytes of a (D, H, W) array are exactly VTK's order
with **x <-> W (last axis), y <-> H, z <-> D (first axis)**: ``WholeExtent="0 W-1 0 H-1 0 D-1"``. The same
holds for the model coordinates (column 0 of x indexes W). ``spacing`` and ``origin`` are given in VTK (x, y, z)
order, i.e. (W-axis, H-axis, D-axis). A 2D (H, W) field becomes a single z plane (``0 W-1 0 H-1 0 0``).

The file uses raw appended binary data with a UInt64 byte-count header (``header_type="UInt64"``,
little endian), which VTK/ParaView >= 5 read. :func:`read_vti` reads such files back (and inline ASCII
data arrays); it is meant for round-trip tests and for our own dumps, not as a general VTK reader.

PNG slices
----------
:func:`write_slice_pngs` writes one slice of the prediction, the truth and their absolute difference with a
common value range for prediction and truth. Images are drawn with the slice's row 0 at the **bottom**
(``flip_vertical=True``: y up, as ParaView shows the x-y plane of an axis-0 slice); columns run left to right
along the slice's last axis.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from util.errors import DataError
from util.files import atomic_write

__all__ = ["write_vti", "read_vti", "write_slice_pngs", "colorize", "take_slice"]

ArrayLike = Any  # numpy array or torch tensor

_VTK_TYPES = {
    np.dtype(np.int8): "Int8", np.dtype(np.uint8): "UInt8", np.dtype(np.int16): "Int16",
    np.dtype(np.uint16): "UInt16", np.dtype(np.int32): "Int32", np.dtype(np.uint32): "UInt32",
    np.dtype(np.int64): "Int64", np.dtype(np.uint64): "UInt64", np.dtype(np.float32): "Float32",
    np.dtype(np.float64): "Float64",
}
_NP_TYPES = {v: k for k, v in _VTK_TYPES.items()}


def _to_numpy(a: ArrayLike) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _xyz(v: Sequence[float], default_z: float, what: str) -> Tuple[float, float, float]:
    v = [float(t) for t in v]
    if len(v) == 2:
        v.append(default_z)
    if len(v) != 3:
        raise ValueError(f"{what} needs 2 or 3 values in (x, y, z) order, got {v}")
    return tuple(v)


def _prepare(arr: ArrayLike, name: str) -> np.ndarray:
    a = _to_numpy(arr)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    elif a.dtype == np.float16:
        a = a.astype(np.float32)
    if np.dtype(a.dtype.newbyteorder("=")) not in _VTK_TYPES:
        raise TypeError(f"array '{name}': unsupported dtype {a.dtype}")
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(a)


def write_vti(path: str, volume: Union[ArrayLike, Mapping[str, ArrayLike]], name: str = "value",
              spacing: Sequence[float] = (1.0, 1.0, 1.0), origin: Sequence[float] = (0.0, 0.0, 0.0)) -> str:
    """Write a (D, H, W) or (H, W) field as a VTK XML ImageData file (point data) that ParaView opens.

    Args:
        path: output file (conventionally ``.vti``); written atomically.
        volume: numpy array / tensor of shape (D, H, W) or (H, W), or a mapping ``{name: array}`` of several
            arrays of one shape (the first becomes the active scalars).
        name: array name when ``volume`` is a single array.
        spacing: grid spacing in VTK (x, y, z) order = (W-axis, H-axis, D-axis); 2 values allowed.
        origin: grid origin in (x, y, z) order; 2 values allowed.

    Returns:
        ``path``.

    Layout: x <-> last array axis (W), z <-> first (D); ``WholeExtent="0 W-1 0 H-1 0 D-1"``; the C-order
    bytes of the array are written unchanged (raw appended data, UInt64 header, little endian).
    """
    arrays = dict(volume) if isinstance(volume, Mapping) else {name: volume}
    if not arrays:
        raise ValueError("no arrays to write")
    prepared: Dict[str, np.ndarray] = {}
    shape = None
    for n, a in arrays.items():
        if not re.fullmatch(r"[A-Za-z0-9_.\-+ ]+", n):
            raise ValueError(f"array name {n!r}: use letters, digits, space and _ . - +")
        a = _prepare(a, n)
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3 or a.size == 0:
            raise ValueError(f"array '{n}': expected a non-empty (D, H, W) or (H, W) array, got shape {a.shape}")
        if shape is None:
            shape = a.shape
        elif a.shape != shape:
            raise ValueError(f"array '{n}' has shape {a.shape}, expected {shape}")
        prepared[n] = a
    d, h, w = shape
    sx, sy, sz = _xyz(spacing, 1.0, "spacing")
    ox, oy, oz = _xyz(origin, 0.0, "origin")
    extent = f"0 {w - 1} 0 {h - 1} 0 {d - 1}"
    lines = ['<?xml version="1.0"?>',
             '<VTKFile type="ImageData" version="1.0" byte_order="LittleEndian" header_type="UInt64">',
             f'  <ImageData WholeExtent="{extent}" Origin="{ox!r} {oy!r} {oz!r}" Spacing="{sx!r} {sy!r} {sz!r}">',
             f'    <Piece Extent="{extent}">',
             f'      <PointData Scalars="{next(iter(prepared))}">']
    offset = 0
    for n, a in prepared.items():
        lines.append(f'        <DataArray type="{_VTK_TYPES[np.dtype(a.dtype.newbyteorder("="))]}" Name="{n}" '
                     f'NumberOfComponents="1" format="appended" offset="{offset}"/>')
        offset += 8 + a.nbytes
    lines += ['      </PointData>', '      <CellData>', '      </CellData>', '    </Piece>', '  </ImageData>',
              '  <AppendedData encoding="raw">', '   _']
    head = ("\n".join(lines)).encode("ascii")

    def _write(f):
        f.write(head)
        for a in prepared.values():
            f.write(np.uint64(a.nbytes).astype("<u8").tobytes())
            f.write(memoryview(a.reshape(-1)).cast("B"))
        f.write(b"\n  </AppendedData>\n</VTKFile>\n")

    return atomic_write(path, _write)


def read_vti(path: str) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Read a .vti written by :func:`write_vti` (raw appended or inline ASCII point data, uncompressed).

    Returns:
        ``(array, info)``: the first point-data array with shape (D, H, W) (C order, x = W fastest), or
        (H, W) when the extent has a single z plane; ``info`` holds ``name``, ``extent`` (6 ints, VTK order),
        ``spacing`` and ``origin`` ((x, y, z) tuples) and ``arrays`` (every point-data array by name).

    Raises:
        DataError (a ValueError) naming the file when it is truncated, corrupt or not VTK XML ImageData;
        NotImplementedError for valid files in a layout this reader does not handle (compressed, several pieces).
    """
    try:
        return _read_vti(path)
    except (DataError, NotImplementedError, OSError):
        raise
    except Exception as e:  # malformed XML, missing attributes, short buffers: name the file
        raise DataError(f"{path}: not a readable VTK XML ImageData file ({type(e).__name__}: {e}); the file is "
                        f"truncated or corrupt") from e


def _read_vti(path: str) -> Tuple[np.ndarray, Dict[str, Any]]:
    with open(path, "rb") as f:
        data = f.read()
    pos = data.find(b"<AppendedData")
    if pos >= 0:
        root = ET.fromstring(data[:pos] + b"</VTKFile>")
        tag_end = data.index(b">", pos)
        m = re.search(rb'encoding="([^"]*)"', data[pos:tag_end])
        encoding = m.group(1).decode() if m else "raw"
        base = data.index(b"_", tag_end) + 1
    else:
        root = ET.fromstring(data)
        encoding, base = None, -1
    if root.tag != "VTKFile" or root.get("type") != "ImageData":
        raise DataError(f"{path}: not a VTK XML ImageData file")
    if root.get("compressor"):
        raise NotImplementedError(f"{path}: compressed data is not supported")
    little = root.get("byte_order", "LittleEndian") == "LittleEndian"
    hdr = np.dtype("u8" if root.get("header_type", "UInt32") == "UInt64" else "u4").newbyteorder(
        "<" if little else ">")
    image = root.find("ImageData")
    extent = [int(t) for t in image.get("WholeExtent").split()]
    nx, ny, nz = (extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1)
    info: Dict[str, Any] = {
        "extent": tuple(extent),
        "spacing": tuple(float(t) for t in image.get("Spacing", "1 1 1").split()),
        "origin": tuple(float(t) for t in image.get("Origin", "0 0 0").split()),
        "arrays": {},
    }
    pieces = image.findall("Piece")
    whole = image.get("WholeExtent").split()
    if len(pieces) != 1 or pieces[0].get("Extent", image.get("WholeExtent")).split() != whole:
        raise NotImplementedError(f"{path}: only single-piece files are supported")
    pdata = pieces[0].find("PointData")
    for da in (pdata.findall("DataArray") if pdata is not None else []):
        dt = _NP_TYPES[da.get("type")].newbyteorder("<" if little else ">")
        ncomp = int(da.get("NumberOfComponents", "1"))
        fmt = da.get("format", "ascii")
        if fmt == "appended":
            if encoding != "raw":
                raise NotImplementedError(f"{path}: appended encoding '{encoding}' is not supported")
            start = base + int(da.get("offset", "0"))
            if start + hdr.itemsize > len(data):
                raise DataError(f"{path}: truncated: array '{da.get('Name')}' starts at byte {start}, the file has "
                                f"{len(data)} bytes")
            nbytes = int(np.frombuffer(data, hdr, 1, start)[0])
            if start + hdr.itemsize + nbytes > len(data):
                raise DataError(f"{path}: truncated: array '{da.get('Name')}' needs {nbytes} bytes from byte "
                                f"{start + hdr.itemsize}, the file has {len(data)} bytes")
            vals = np.frombuffer(data, dt, nbytes // dt.itemsize, start + hdr.itemsize)
        elif fmt == "ascii":
            vals = np.array((da.text or "").split(), dtype=dt)
        else:
            raise NotImplementedError(f"{path}: DataArray format '{fmt}' is not supported")
        shape = (nz, ny, nx) + ((ncomp,) if ncomp > 1 else ())
        if vals.size != int(np.prod(shape)):
            raise DataError(f"{path}: array '{da.get('Name')}' has {vals.size} values, expected {shape}")
        arr = vals.astype(dt.newbyteorder("="), copy=True).reshape(shape)
        if nz == 1:
            arr = arr[0]
        info["arrays"][da.get("Name")] = arr
    if not info["arrays"]:
        raise DataError(f"{path}: no point data")
    info["name"] = next(iter(info["arrays"]))
    return info["arrays"][info["name"]], info


# --- PNG slices ---------------------------------------------------------------------------------------------

# Colormaps as piecewise-linear RGB anchors (approximations of perceptually uniform maps).
_CMAPS = {
    "gray": [(0, 0, 0), (255, 255, 255)],
    "viridis": [(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142), (31, 158, 137),
                (53, 183, 121), (110, 206, 88), (181, 222, 43), (253, 231, 37)],
    "inferno": [(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85), (227, 89, 51),
                (249, 140, 10), (249, 201, 50), (252, 255, 164)],
}


def colorize(x: np.ndarray, vmin: float, vmax: float, cmap: str = "viridis") -> np.ndarray:
    """Map a 2D array to uint8 RGB (H, W, 3) with a linear [vmin, vmax] scale; NaN -> the lowest colour."""
    if cmap not in _CMAPS:
        raise ValueError(f"unknown colormap '{cmap}', choose from {sorted(_CMAPS)}")
    x = np.asarray(x, dtype=np.float64)
    span = float(vmax) - float(vmin)
    t = (x - vmin) / span if span > 0 else np.zeros_like(x)
    t = np.clip(np.nan_to_num(t, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    anchors = np.asarray(_CMAPS[cmap], dtype=np.float64)
    pos = np.linspace(0.0, 1.0, len(anchors))
    rgb = np.stack([np.interp(t, pos, anchors[:, i]) for i in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def take_slice(volume: ArrayLike, axis: int = 0, index: Optional[int] = None) -> np.ndarray:
    """A 2D slice of a (D, H, W) volume (middle slice by default); a 2D array is returned as is."""
    a = _to_numpy(volume)
    if a.ndim == 2:
        return a
    if a.ndim != 3:
        raise ValueError(f"expected a 2D or 3D array, got shape {a.shape}")
    n = a.shape[axis]
    index = n // 2 if index is None else int(index)
    if not -n <= index < n:
        raise IndexError(f"slice index {index} out of range for axis {axis} of size {n}")
    return np.take(a, index, axis=axis)


def _png(path: str, rgb: np.ndarray, scale: int, flip_vertical: bool) -> str:
    from PIL import Image

    if flip_vertical:
        rgb = rgb[::-1]
    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    img = Image.fromarray(np.ascontiguousarray(rgb))  # uint8 (H, W, 3) -> RGB
    return atomic_write(path, lambda f: img.save(f, format="PNG"))


def write_slice_pngs(path_prefix: str, pred: ArrayLike, gt: ArrayLike, axis: int = 0, index: Optional[int] = None,
                     cmap: str = "viridis", err_cmap: str = "inferno", scale: Optional[int] = None,
                     vmin: Optional[float] = None, vmax: Optional[float] = None,
                     flip_vertical: bool = True) -> Dict[str, str]:
    """PNG images of one slice of the prediction, the truth and the absolute error.

    Args:
        path_prefix: files ``<prefix>_pred.png``, ``<prefix>_true.png``, ``<prefix>_err.png``.
        pred, gt: (D, H, W) or (H, W) arrays/tensors of one shape (any units).
        axis: slicing axis of a 3D volume (0 = D: an (H, W) image).
        index: slice index along ``axis`` (default: the middle, ``n // 2``).
        cmap: colormap of pred/truth: "viridis", "inferno" or "gray".
        err_cmap: colormap of the error image.
        scale: integer nearest-neighbour magnification; default: the smallest factor giving >= 256 pixels on
            the longer side (1 for slices of 256 or more).
        vmin, vmax: value range of pred and truth (default: min/max of the finite values of both slices).
            The error image spans [0, max |pred - gt|].
        flip_vertical: draw slice row 0 at the bottom (y up).

    Returns:
        ``{"pred": path, "true": path, "err": path}``.
    """
    p = take_slice(pred, axis, index).astype(np.float64)
    g = take_slice(gt, axis, index).astype(np.float64)
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch: pred slice {p.shape} vs gt slice {g.shape}")
    both = np.concatenate([p.ravel(), g.ravel()])
    finite = both[np.isfinite(both)]
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    err = np.abs(p - g)
    err_finite = err[np.isfinite(err)]
    emax = float(err_finite.max()) if err_finite.size else 0.0
    if scale is None:
        scale = max(1, -(-256 // max(p.shape)))
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    out = {
        "pred": _png(f"{path_prefix}_pred.png", colorize(p, lo, hi, cmap), scale, flip_vertical),
        "true": _png(f"{path_prefix}_true.png", colorize(g, lo, hi, cmap), scale, flip_vertical),
        "err": _png(f"{path_prefix}_err.png", colorize(err, 0.0, emax, err_cmap), scale, flip_vertical),
    }
    return out
