"""
formats/tensor_files.py: the files of other people's checkpoints, read without running any code in them. The
safetensors format by hand (a dozen lines each way), its shards, pytorch_model.bin as plain tensors only,
GGUF through the gguf package (llama.cpp's reference reader), and JSON. formats/checkpoints.py maps what
they hold onto our GPT; formats/bpe.py builds the tokenizer.
"""
import json
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


def read_safetensors(path):
    """The safetensors format: 8 bytes little-endian header size, a JSON header mapping each name
    to its dtype, shape and byte range, then the raw bytes. A dozen lines, no code execution."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        data = bytearray(f.read())
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which nanosteer does not read")
        start, end = info["data_offsets"]
        flat = torch.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]) if end > start else torch.zeros(0)
        tensors[name] = flat.reshape(info["shape"]).float()
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
        return torch.load(path, map_location="cpu", weights_only=True)       # no code runs
    except Exception as e:  # the pickle holds more than tensors, or is no pickle at all
        raise ValueError(f"{path} is not a plain file of tensors ({type(e).__name__}), so nanosteer "
                         "refuses it (it could run code); use its model.safetensors") from None


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
