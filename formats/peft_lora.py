"""
formats/peft_lora.py: a model's LoRA as a peft adapter folder, and a peft adapter folder as LoRA.

    save_peft(model, "folder")     # adapter_config.json + adapter_model.safetensors
    load_peft(model, "folder")     # the other way: checked whole, then put onto the model

peft's LoRA (Hu et al., 2021) is our LoRALinear term for term: y = W x + (lora_alpha / r)·B A x,
its tensors named base_model.model.<Hugging Face module>.lora_A.weight (r, in) and .lora_B.weight
(out, r). Only the names differ, and they are transformers' (formats/checkpoints.py maps them):
- GPT-2: ours are GPT-2's own (transformer.h.3.attn.c_attn). transformers keeps these layers as
  Conv1D, W stored (in, out); peft's A and B are the same either way, and fan_in_fan_out = True
  only tells peft to transpose B A when it merges them into such a W.
- Llama (SmolLM2 as transformers reads its GGUF): model.layers.3.self_attn.o_proj and so on. Our
  attn.c_attn is q_proj, k_proj and v_proj in one: its LoRA, one A and B stacked [B_q; B_k; B_v],
  is three peft LoRAs that share A. Back here, three LoRAs that share A become that again; three
  with their own A (r each) become one LoRA of rank 3r, A = [A_q; A_k; A_v] and B block-diagonal,
  alpha 3·lora_alpha: the same scale, the same function. Rotary: our q and k rows are in Hugging
  Face's order (checkpoints.py undoes llama.cpp's permutation, and so does transformers when it
  reads a GGUF), so B's rows go across as they are.
Whatever else a file asks of peft (DoRA, rsLoRA, biases, extra trained modules, ...) would compute
something our LoRALinear does not: refused, naming the field.
"""
import json
import os
import re

import torch

from formats.checkpoints import HF_LLAMA, LLAMA
from formats.tensor_files import read_json, read_safetensors, write_safetensors
from machinery.files import write_files
from nanosteer import LoRALinear, adapter_parameters, attach, linear_layers, lora_plan

CONFIG, WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
OURS_TO_LLAMA = {ours: theirs for theirs, ours in HF_LLAMA.items()}      # "mlp.c_fc" -> "mlp.up_proj"

# adapter_config.json: the fields read below, and those that do not change what a loaded adapter
# computes (names, versions, dropout, which is off at inference, settings of options left off).
# Every other field must be off (None, False, {} or []): each one turns on something else.
READ = {"peft_type", "r", "lora_alpha", "target_modules", "layers_to_transform", "layers_pattern",
        "bias", "fan_in_fan_out", "init_lora_weights"}
IGNORED = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
           "inference_mode", "lora_dropout", "megatron_core", "qalora_group_size"}

# ---------------------------------------------------------------------------------------------
# our Linear layers under their Hugging Face names


def family(model):
    """'gpt2' or 'llama': the transformers class whose module names the adapter uses."""
    c = model.config
    if all(getattr(c, field) == value for field, value in LLAMA.items()):
        return "llama"
    if (c.mlp, c.norm, c.pos, c.bias) == ("gelu", "layernorm", "learned", True):
        return "gpt2"
    raise ValueError(f"this model (mlp={c.mlp}, norm={c.norm}, pos={c.pos}, bias={c.bias}) is neither a "
                     "GPT-2 nor a Llama of transformers: peft has no names for its layers")


def hf_pieces(model, layer, path):
    """Our Linear `path` of block `layer` -> [(the Hugging Face module, the rows of our output it
    computes)]: one piece, or q, k and v for a Llama's attn.c_attn."""
    if family(model) == "gpt2":
        return [(f"transformer.h.{layer}.{path}", slice(None))]
    if path != "attn.c_attn":
        return [(f"model.layers.{layer}.{OURS_TO_LLAMA[path]}", slice(None))]
    c = model.config
    q, kv = c.n_embd, (c.n_kv_head or c.n_head) * (c.n_embd // c.n_head)      # rows of q; of k and of v
    rows = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
    return [(f"model.layers.{layer}.{OURS_TO_LLAMA[x]}", rows[x]) for x in "qkv"]


def hf_modules(model):
    """{Hugging Face module: (layer, our path, rows)} for every Linear in the model's blocks."""
    return {name: (layer, path, rows) for layer, path, *_ in linear_layers(model)
            for name, rows in hf_pieces(model, layer, path)}

# ---------------------------------------------------------------------------------------------
# out: a peft adapter folder


def save_peft(model, folder):
    """Write the model's LoRA as a peft adapter folder (both files or neither, write_files). The
    model must hold LoRA of one rank and alpha and nothing else: a shift has no place in the file."""
    shifts = [name for name in adapter_parameters(model) if ".slots." in name]
    if shifts:
        raise ValueError(f"this model also holds shifts ({shifts[0].split('.shift.')[0]}), which a peft "
                         "LoRA file cannot hold: export LoRA alone, or the shifts with --to-cvec")
    loras = [(layer, path, child) for layer, path, _, _, child in linear_layers(model)
             if isinstance(child, LoRALinear)]
    if not loras:
        raise ValueError("this model holds no LoRA to export")
    if len({(child.rank, child.alpha) for *_, child in loras}) > 1:
        raise ValueError("this model's LoRA layers differ in rank or alpha; this export writes one r and "
                         "one lora_alpha for all")
    tensors = {}
    for layer, path, child in loras:
        for name, rows in hf_pieces(model, layer, path):
            tensors[f"{PREFIX}{name}.lora_A.weight"] = child.lora_A
            tensors[f"{PREFIX}{name}.lora_B.weight"] = child.lora_B[rows]
    rank, alpha = loras[0][2].rank, loras[0][2].alpha
    modules = sorted({key[len(PREFIX):].rsplit(".lora_", 1)[0] for key in tensors})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=alpha, target_modules=modules,
                  bias="none", fan_in_fan_out=family(model) == "gpt2", lora_dropout=0.0, use_rslora=False,
                  use_dora=False, inference_mode=True)
    try:
        write_files(folder, {CONFIG: lambda tmp: write_text(json.dumps(config, indent=2), tmp),
                             WEIGHTS: lambda tmp: write_safetensors(tensors, tmp)})
    except OSError as e:
        raise ValueError(f"cannot write {folder} ({e.strerror}: {e.filename}): give a writable folder") from None
    return modules


def write_text(text, path):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")

# ---------------------------------------------------------------------------------------------
# in: a peft adapter folder, checked whole


def check_config(config, model, source):
    """adapter_config.json -> (r, lora_alpha), or the one-line refusal of the first field that
    asks for something else than plain LoRA on this model's Linear layers."""
    def refuse(field):
        return ValueError(f"{source}: {field} = {config[field]!r} is not supported by nanosteer's LoRA "
                          "(it would compute something else); not loaded")
    if not isinstance(config, dict) or "r" not in config or "lora_alpha" not in config:
        raise ValueError(f"{source} is not a peft LoRA config (no r, lora_alpha)")
    for field, wanted in (("peft_type", "LORA"), ("bias", "none")):
        if config.get(field, wanted) != wanted:
            raise refuse(field)
    if config.get("init_lora_weights", True) not in (True, False, "gaussian"):
        raise refuse("init_lora_weights")    # pissa, olora, loftq, corda... change the base weights
    for field, value in config.items():
        if field not in READ | IGNORED and value not in (None, False, {}, []):
            raise refuse(field)               # use_dora, use_rslora, modules_to_save, rank_pattern...
    r, alpha = config["r"], config["lora_alpha"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise refuse("r")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
        raise refuse("lora_alpha")
    targets = config.get("target_modules")
    if not isinstance(targets, (str, list)):
        raise ValueError(f"{source}: target_modules must name the modules (a list or a pattern), not {targets!r}")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"{source}: target_modules {targets!r} is not a regular expression ({e})") from None
    only = config.get("layers_to_transform")
    if isinstance(targets, str) and only not in (None, []):
        raise ValueError(f"{source}: layers_to_transform cannot be used with a pattern target_modules "
                         "(peft refuses it too)")
    if only is not None and not (isinstance(only, int) or isinstance(only, list) and all(
            isinstance(layer, int) for layer in only)):
        raise refuse("layers_to_transform")
    pattern = "h" if family(model) == "gpt2" else "layers"     # where the block number sits
    if only not in (None, []) and config.get("layers_pattern") not in (None, pattern, [pattern]):
        raise refuse("layers_pattern")
    return r, alpha


def targeted(config, name, layer):
    """peft's rule (its check_target_module_exists): a pattern (a string) must match the whole name;
    a list names a module whole, in any block, or by the end of its name after a dot, and only that
    second way is limited to the blocks of layers_to_transform (None or []: every block)."""
    targets = config["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    only = config.get("layers_to_transform")
    in_blocks = only in (None, []) or layer in ([only] if isinstance(only, int) else only)
    return in_blocks and any(name.endswith("." + t) for t in targets)


def read_factors(model, config, tensors, source):
    """The file's tensors -> {Hugging Face module: {"lora_A": A, "lora_B": B}}, each name, shape and
    value checked; the modules must be exactly those target_modules names (peft skips the others)."""
    modules, factors = hf_modules(model), {}
    for key, t in tensors.items():
        name, _, leaf = key.removeprefix(PREFIX).rpartition(".")
        name, _, which = name.rpartition(".")
        if not key.startswith(PREFIX) or which not in ("lora_A", "lora_B") or leaf != "weight":
            raise ValueError(f"{source}: tensor {key!r} is not a LoRA factor (lora_A / lora_B weight)")
        if name not in modules:
            raise ValueError(f"{source}: {name} is not a Linear of this model's blocks; nanosteer puts "
                             "LoRA only there")
        factors.setdefault(name, {})[which] = t
    wanted = {name for name, (layer, _, _) in modules.items() if targeted(config, name, layer)}
    stray = sorted(wanted ^ set(factors))
    if stray:
        where = "has no tensors for it" if stray[0] in wanted else "does not name it in target_modules"
        raise ValueError(f"{source}: {stray[0]}: target_modules and the tensors disagree (the file {where})")
    r = config["r"]
    for name, ab in factors.items():
        layer, path, rows = modules[name]
        W = model.get_submodule(f"transformer.h.{layer}.{path}").weight            # (out, in)
        out = len(range(W.shape[0])[rows])                                           # its rows here
        for which, shape in (("lora_A", (r, W.shape[1])), ("lora_B", (out, r))):
            t = ab.get(which)
            if t is None or tuple(t.shape) != shape or not torch.isfinite(t).all():
                got = "missing" if t is None else f"shape {tuple(t.shape)}"
                raise ValueError(f"{source}: {name}.{which}.weight is {got}; this model needs {shape}, finite")
            if not torch.equal(t.to(W.dtype).to(t.dtype), t):        # float64 factors on a float32 model
                raise ValueError(f"{source}: {name}.{which}.weight is {t.dtype} with values a {W.dtype} model "
                                 f"would round; load it onto a {t.dtype} model")
    return factors


def plan_lora(model, config, factors):
    """read_factors' {Hugging Face module: A and B} -> the LoRALinear layers to attach, filled."""
    r, alpha, plan = config["r"], config["lora_alpha"], []
    for layer, path, _, _, child in linear_layers(model):
        pieces = [(rows, factors[name]) for name, rows in hf_pieces(model, layer, path) if name in factors]
        if not pieces:
            continue
        shared = all(torch.equal(ab["lora_A"], pieces[0][1]["lora_A"]) for _, ab in pieces)
        As = [pieces[0][1]["lora_A"]] if shared else [ab["lora_A"] for _, ab in pieces]
        B = torch.zeros(child.weight.shape[0], r * len(As), dtype=child.weight.dtype)
        for i, (rows, ab) in enumerate(pieces):
            j = 0 if shared else i                  # which r columns of B: the A it shares
            B[rows, j * r:(j + 1) * r] = ab["lora_B"]
        (name, parent, attribute, module), = lora_plan(model, r * len(As), alpha * len(As), (path,), [layer])
        with torch.no_grad():
            module.lora_A.copy_(torch.cat(As))
            module.lora_B.copy_(B)
        plan.append((name, parent, attribute, module))
    return plan


def load_peft(model, folder):
    """A peft LoRA adapter folder onto a model that holds no adapters; refused in one line, the
    model unchanged, if any part of it cannot be computed exactly here."""
    held = adapter_parameters(model)
    if held or getattr(model, "merged_lora", False):
        raise ValueError(f"this model already holds adapters ({next(iter(held), 'merged LoRA')}): "
                         "load the peft adapter onto a model without any")
    config_path, weights_path = os.path.join(folder, CONFIG), os.path.join(folder, WEIGHTS)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise ValueError(f"{folder} is not a peft adapter folder ({os.path.basename(path)} missing)")
    try:
        config = read_json(config_path)
    except ValueError:      # json's error names no file
        raise ValueError(f"{config_path} is not a JSON file") from None
    try:
        tensors = read_safetensors(weights_path)
    except Exception as e:  # a damaged file fails in many ways; a dtype we do not read says so
        why = str(e) if str(e).startswith(weights_path) else f"{weights_path} is not a safetensors file"
        raise ValueError(f"{why} ({type(e).__name__}); not loaded") from None
    check_config(config, model, config_path)
    attach(plan_lora(model, config, read_factors(model, config, tensors, weights_path)))
    return model
