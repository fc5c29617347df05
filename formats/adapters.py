"""
formats/adapters.py: adapter files. The adapters of a model (its shifts and LoRA factors, nanosteer.py)
with what is needed to rebuild them, and nothing of the base model: kilobytes where the model is
megabytes. A file is checked as a whole before the model changes, its base by a sha256 of every base
weight (a file of format 2 by the 8 entries a tensor it recorded). A first read skips this file.

    adapters.save(model, "out/x/adapters.pt")
    adapters.load(base_model, "out/x/adapters.pt")    # the same model as after training
"""
import hashlib
import os
from dataclasses import asdict

import torch

from machinery.files import save_torch, write_atomically
from nanosteer import (LoRALinear, adapter_parameters, attach, linear_layers, lora_plan, own_tensors,
                       shift_plan)


FORMAT = "nanosteer-adapters-3"         # 3: the file records a sha256 of every base weight
OLD_FORMATS = {"nanosteer-adapters-2": "a fingerprint of 8 entries a tensor",   # still checked so
               "nanosteer-adapters-1": "no fingerprint"}                          # (1: any_base=True)


def base_digest(model, rounded=False):
    """sha256 of every base weight (adapters left out), name, shape and value: each value as a
    float32 (so float32, float64 and bfloat16 copies of one base agree), a float64 tensor as
    float64 where float32 cannot hold its values; rounded=True: every value rounded to bfloat16
    (the digest a bfloat16 copy of the base is checked by)."""
    adapters, digest = adapter_parameters(model), hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name in adapters:
            continue
        t = tensor.detach().cpu().reshape(-1)
        if rounded:
            t = t.to(torch.bfloat16)
        elif not (t.dtype == torch.float64 and not torch.equal(t.float().double(), t)):
            t = t.float()
        digest.update(f"{name} {tuple(tensor.shape)} {t.dtype};".encode())
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sampled_fingerprint(model):
    """Format 2's fingerprint: 8 evenly spaced entries of every tensor, rounded to bfloat16, hashed.
    Kept to check the files it is in; it misses a base that differs elsewhere (format 3 does not)."""
    adapters, digest = adapter_parameters(model), hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name not in adapters and tensor.numel() > 0:
            flat = tensor.detach().reshape(-1)
            picks = torch.linspace(0, len(flat) - 1, 8, dtype=torch.float64).round().long()
            sample = flat[picks.to(flat.device)].to(torch.bfloat16).float().cpu()
            digest.update(name.encode() + sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def same_base(model, payload):
    """Is the model the base the file was made on? Format 3: every weight the same; a model held
    in bfloat16: every weight the same once the file's base is rounded to bfloat16 too."""
    if payload["format"] == "nanosteer-adapters-2":
        return payload.get("base_fingerprint") == sampled_fingerprint(model)
    if payload["format"] != FORMAT:
        return False
    if payload.get("base_sha256") == base_digest(model):
        return True
    held_in_bf16 = any(t.dtype == torch.bfloat16 for t in model.parameters())
    return held_in_bf16 and payload.get("base_sha256_bf16") == base_digest(model, rounded=True)


def save(model, path):
    """Write the adapters (what each is, its tensors, the base model's config and fingerprint) to
    path, atomically; missing folders are made. After merge() the LoRA update is in the weights,
    where no adapter file looks: refused."""
    if getattr(model, "merged_lora", False):
        raise ValueError("LoRA is merged into this model's weights, which no adapter file holds:"
                         " save the whole model (model.save), or the adapters before merge()")
    spec = [dict(layer=layer, site=site, kind=s.shift.kind, rank=s.shift.rank, act=s.shift.act)
            for layer, block in enumerate(model.transformer.h) for site, s in block.slots.items()
            if s.shift is not None]
    spec += [dict(layer=layer, site=path, kind="lora", rank=child.rank, alpha=child.alpha)
             for layer, path, _, _, child in linear_layers(model) if isinstance(child, LoRALinear)]
    payload = dict(format=FORMAT, base_config=asdict(model.config), adapters=spec,
                   base_sha256=base_digest(model), base_sha256_bf16=base_digest(model, rounded=True),
                   tensors={k: p.detach().cpu() for k, p in adapter_parameters(model).items()})
    try:
        write_atomically(path, lambda tmp: save_torch(payload, tmp))
    except OSError as e:                    # a folder in the way, a file where a folder is wanted
        raise ValueError(f"cannot write {path} ({e.strerror}: {e.filename}): give a file name "
                         "in a writable folder") from None


def read_adapter_file(path):
    """The payload of an adapter file, its fields of the right types. Only tensors and plain data
    are read (weights_only): a file cannot run code."""
    if not os.path.isfile(path):
        raise ValueError(f"adapter file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, a pickle of code: all the same to the user
        raise ValueError(f"{path} is not a nanosteer adapter file ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") not in (FORMAT, *OLD_FORMATS):
        raise ValueError(f"{path} is not a nanosteer adapter file (format {FORMAT} expected)")
    for field, kind in dict(base_config=dict, adapters=list, tensors=dict).items():
        if not isinstance(payload.get(field), kind):
            raise ValueError(f"{path}: its {field} is missing or malformed: save the adapters anew")
    return payload


def check_base(model, payload, path, any_base):
    """The file's base config must be the model's (dropout aside: it changes no shape), and so
    must the fingerprint of its base weights, unless any_base."""
    ours, theirs = asdict(model.config), payload["base_config"]
    for key in sorted((set(ours) | set(theirs)) - {"dropout"}):
        if ours.get(key) != theirs.get(key):
            raise ValueError(f"{path} was made for a model with {key}={theirs.get(key)}, "
                             f"this model has {key}={ours.get(key)}")
    if not any_base and not same_base(model, payload):
        old = f" ({payload['format']}: {OLD_FORMATS[payload['format']]})" if payload["format"] in OLD_FORMATS else ""
        raise ValueError(f"{path} was made on other base weights{old} (same config, other weights):"
                         " load it onto the model it was trained on, or pass any_base=True")


def plan_from_file(model, payload, path):
    """Every adapter the file lists, checked and built, its tensors filled in; none attached."""
    plan = []
    for i, a in enumerate(payload["adapters"]):
        try:
            if a["kind"] == "lora":
                plan += lora_plan(model, a["rank"], a["alpha"], (a["site"],), a["layer"])
            else:
                act = a["act"] or "silu"                # saved as None where the kind has none
                plan += shift_plan(model, a["site"], a["kind"], a["rank"], a["layer"], act)
        except (KeyError, TypeError, ValueError) as e:
            why = f"{type(e).__name__}: {e}"
            raise ValueError(f"{path}: adapter {i} cannot be rebuilt ({why})") from None
    if len({(id(parent), attribute) for _, parent, attribute, _ in plan}) < len(plan):
        raise ValueError(f"{path} lists two adapters for one place: the file is damaged")
    fill(plan, payload["tensors"], path)
    return plan


@torch.no_grad()

def fill(plan, tensors, path):
    """Copy the file's tensors into the planned (not yet attached) adapters: every name, shape and
    kind must be right, and every value finite."""
    wanted = {}
    for name, _, _, module in plan:
        wanted.update({f"{name}.{k}": p for k, p in own_tensors(module).items()})
    missing, extra = sorted(set(wanted) - set(tensors)), sorted(set(tensors) - set(wanted))
    if missing or extra:
        what = f"{missing[0]} is missing" if missing else f"{extra[0]} is not expected"
        raise ValueError(f"{path}: its tensors do not match its adapters ({what})")
    for key, p in wanted.items():
        t = tensors[key]
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == p.shape
                and torch.isfinite(t).all()):
            raise ValueError(f"{path}: {key} must be a finite float tensor of shape "
                             f"{tuple(p.shape)}")
        p.copy_(t)


def load(model, path, any_base=False):
    """Rebuild the adapters saved in path on a model that holds none, and load their tensors. The
    whole file is checked first (format, base config and weights, every adapter, every tensor's
    name, shape and kind): a refused file leaves the model as it was. any_base=True loads onto
    other base weights of the same config (adapters moved to another base, knowingly)."""
    payload = read_adapter_file(path)
    held = adapter_parameters(model)
    if held or getattr(model, "merged_lora", False):
        raise ValueError(f"this model already holds adapters ({next(iter(held), 'merged LoRA')}): "
                         f"load {path} onto a model without any")
    check_base(model, payload, path, any_base)
    attach(plan_from_file(model, payload, path))
    return model
