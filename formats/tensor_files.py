"""
formats/tensor_files.py: the files of other people's checkpoints, read without running any code in them. The
safetensors format by hand (a dozen lines each way), its shards, pytorch_model.bin as plain tensors only,
GGUF through the gguf package (llama.cpp's reference reader), and JSON. formats/checkpoints.py maps what
they hold onto our GPT; formats/bpe.py builds the tokenizer.
"""
import json
import math
import os

import torch

from machinery import files


def unsupported(source, field, value):
    """The one-line refusal of a setting our model does not implement (formats/bpe.py, formats/checkpoints.py)."""
    return ValueError(f"{source}: {field} = {value!r} is not supported by nanosteer's model (it would "
                      "compute something else); not loaded")


def is_gguf(path):
    """A GGUF file, whatever its suffix: the format's magic bytes."""
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_json(path):
    """The JSON file at path as a dict, checked (machinery/files.py); {} when there is no such file."""
    return files.read_json(path) if os.path.exists(path) else {}


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
MAX_HEADER = 100_000_000      # bytes: the reference reader's own bound on a header (safetensors: 100 MB)


def whole_numbers(values):
    """A list of whole numbers ≥ 0 (JSON's true is not one)."""
    return isinstance(values, list) and all(type(x) is int and x >= 0 for x in values)


def safetensors_header(path, f):
    """The header of an open safetensors file, checked against the file before a tensor is read:
    its length within MAX_HEADER and the file, a JSON object whose every entry has a dtype we
    read, a shape of whole numbers and data_offsets inside the file holding exactly that shape."""
    size = os.fstat(f.fileno()).st_size
    length = int.from_bytes(f.read(8), "little")
    if size < 8 or length > min(MAX_HEADER, size - 8):
        raise ValueError(f"{path} is not a safetensors file, or is truncated: its header length {length} "
                         f"exceeds the file ({size} bytes) or 100 MB")
    try:
        header = json.loads(f.read(length))
    except (UnicodeDecodeError, ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file, or is damaged: its header is not a JSON object")
    data_size = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        info = info if isinstance(info, dict) else {}
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info.get('dtype')}, which nanosteer does not read "
                             f"(it reads {', '.join(SAFETENSORS_DTYPES)})")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (whole_numbers(shape) and whole_numbers(offsets) and len(offsets) == 2):
            raise ValueError(f"{path}: tensor {name} has no valid shape and data_offsets: the file is damaged")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[info["dtype"]].itemsize
        if not (offsets[0] + nbytes == offsets[1] <= data_size):
            raise ValueError(f"{path}: tensor {name}'s bytes {offsets} do not hold its shape {shape} inside "
                             f"the file's {data_size} bytes of data: the file is truncated or damaged")
    return header


def read_safetensors(path):
    """The safetensors format: 8 bytes little-endian header size, a JSON header mapping each name
    to its dtype, shape and byte range, then the raw bytes. No code execution. float16 and bfloat16
    come back as float32 (exactly), float64 as float64 (never rounded)."""
    with open(path, "rb") as f:
        header = safetensors_header(path, f)
        data = bytearray(f.read())
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        flat = torch.frombuffer(data[start:end], dtype=dtype) if end > start else torch.zeros(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"]).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return tensors


def write_safetensors(tensors, path):
    """{name: tensor} -> a safetensors file at path, every tensor as float32 (F32): the header
    read_safetensors reads, padded with spaces to a multiple of 8 bytes as the reference writer does."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in tensors.items():
        data = tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def read_weights(folder):
    """model.safetensors, or the shards listed in model.safetensors.index.json (what
    save_pretrained writes for large models), or a pytorch_model.bin of plain tensors."""
    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return read_safetensors(single)
    if os.path.isfile(index):
        shards = sorted(set(read_json(index)["weight_map"].values()))
        if any(os.path.basename(s) != s or not os.path.isfile(os.path.join(folder, s)) for s in shards):
            raise ValueError(f"{index} names shards that are not files in {folder}")
        tensors = {}
        for shard in shards:
            tensors |= read_safetensors(os.path.join(folder, shard))
        return tensors
    path = os.path.join(folder, "pytorch_model.bin")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no weights: nanosteer reads model.safetensors, its shards "
                         "(model.safetensors.index.json) or pytorch_model.bin")
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)       # no code runs
    except Exception as e:  # the pickle holds more than tensors, or is no pickle at all
        raise ValueError(f"{path} is not a plain file of tensors ({type(e).__name__}), so nanosteer "
                         "refuses it (it could run code); use its model.safetensors") from None
    if not (isinstance(tensors, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                              for k, t in tensors.items())):
        raise ValueError(f"{path} is not a mapping of names to tensors: the file is damaged")
    return tensors


def read_gguf(path):
    """The gguf package's reader (the format's reference): metadata parsed, tensors mapped, not read."""
    try:
        import gguf
    except ImportError:
        raise ValueError(f"reading {path} needs the gguf package: pip install gguf") from None
    try:
        return gguf, gguf.GGUFReader(path)
    except Exception as e:  # truncated or corrupt files fail in many ways inside the reader
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: truncated or corrupt?)") from None
