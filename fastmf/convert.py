"""Convert an official iMF / pMF PyTorch checkpoint (Lyy-iiis/imeanflow and Lyy-iiis/pMF, branch
`torch`) into a fastmf checkpoint that sample.py and train.py --init-from take.

    python -m fastmf.convert imf iMF-B-2.pth runs/imf_b2 --image-size 32
    python -m fastmf.convert pmf pMF-B-16.pth runs/pmf_b16

The .pth is read with torch.load(weights_only=True) only: a file that needs anything beyond
plain tensors and containers is refused, and no code from it runs. Names map onto MiT (flax
wrappers dropped, p x p convs as linears over (pi, pj, c) features, token tables flattened; pMF's
MiT sits inside the x-prediction wrapper as `net`, as in the official pMF net), and the sizes
(width, depth, heads, head depth, condition tokens, MLP width, patch, channels, classes) are read
off the tensors. Unknown or missing keys are an error that lists them. The output folder gets
ckpt_0000000.safetensors with the weights as both params and EMA.
"""
import argparse
import pickle
import sys
import warnings
from pathlib import Path

import torch

from fastmf.ckpt import checkpoint_path, flatten_state, save_checkpoint
from fastmf.cli import fail, first_line
from fastmf.models import PRESETS, build
from fastmf.prepare_latents import IMF_MEAN, IMF_STD

KNOWN_BUFFERS = ("rope_freqs",)  # tables fastmf recomputes (pMF keeps its RoPE table in the state dict)


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an official .pth (a state dict, possibly nested in one dict entry), safely."""
    try:
        with warnings.catch_warnings():  # torch's advice to retry without weights_only is not for us
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        fail(f"refused {path}: not a plain tensor checkpoint (weights_only load: {first_line(e)[:200]})")
    except OSError as e:
        fail(f"cannot read {path}: {e}")
    except Exception as e:  # a damaged file fails the zip reader or the unpickler in many ways
        fail(f"cannot read {path}: not a torch checkpoint, or a damaged one ({type(e).__name__}: {first_line(e)[:200]})")
    while isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
        obj = next(iter(obj.values()))  # e.g. {"model": state_dict} or {"ema": state_dict}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        fail(f"{path} holds no state dict of tensors")
    return obj


def to_fastmf_names(state: dict[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """Official names and layouts -> MiT's."""
    out, prefix = {}, "net." if variant == "pmf" else ""
    for key, w in state.items():
        name = key.removeprefix("net.").replace("._flax_linear", "").replace("._flax_embedding", "")
        if name.endswith(KNOWN_BUFFERS):
            continue
        if w.dim() == 4:  # conv (out, in, p, p) -> linear over features ordered (pi, pj, c)
            w = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
        if name.endswith(("_tokens", "pos_embed")):
            w = w.reshape(-1, w.shape[-1])
        out[prefix + name] = w
    return out


def sizes(state: dict[str, torch.Tensor], variant: str, image_size: int | None) -> dict:
    """MiTConfig fields read off the official tensors."""
    count = lambda group: len({k.split(".")[2] for k in state if k.startswith(f"net.{group}.")})
    embed = state.get("net.x_embedder.proj.weight", state.get("net.x_embedder.proj1.weight"))
    if embed is None:
        fail("no x_embedder weights: not an official iMF / pMF checkpoint")
    hidden, in_channels, patch = state["net.h_embedder.mlp.0._flax_linear.weight"].shape[0], embed.shape[1], embed.shape[2]
    head_dim = state["net.shared_blocks.0.attn.q_norm.weight"].shape[0]
    aux, shared = count("u_heads"), count("shared_blocks")
    mlp = state["net.shared_blocks.0.mlp.w1._flax_linear.weight"].shape[0]
    tokens = {f"num_{n}_tokens": state[f"net.{t}_tokens"].reshape(-1, hidden).shape[0]
              for n, t in (("class", "class"), ("cfg", "omega"), ("interval", "t_min"), ("time", "time"))}
    if variant == "pmf":  # the position table covers prefix + patches: the grid follows
        grid = round((state["net.pos_embed"].reshape(-1, hidden).shape[0] - sum(tokens.values())
                      - tokens["num_interval_tokens"]) ** 0.5)
        image_size = grid * patch
    elif image_size is None:
        fail("iMF checkpoints do not record their input size: pass --image-size (32 for ImageNet 256 latents)")
    return dict(hidden_size=hidden, num_heads=hidden // head_dim, depth=shared + aux, aux_head_depth=aux,
                mlp_ratio=(mlp + 0.5) / hidden,  # int(hidden * ratio) == mlp exactly
                patch_size=patch, in_channels=in_channels, input_size=(image_size, image_size),
                num_classes=state["net.y_embedder.embedding_table._flax_embedding.weight"].shape[0] - 1, **tokens)


def preset_name(cfg: dict, variant: str) -> str:
    """The MiT preset of these sizes, the variant's own first (pmf-l before mit-l), else mit-tiny (the
    record's config carries the sizes either way)."""
    keys = ("depth", "hidden_size", "num_heads", "aux_head_depth")
    names = sorted((n for n in PRESETS if n.startswith(("mit-", "pmf-"))), key=lambda n: not n.startswith(variant))
    return next((n for n in names if all(PRESETS[n].get(k) == cfg[k] for k in keys)), "mit-tiny")


def convert(variant: str, path: Path, image_size: int | None = None):
    """(model with the official weights loaded, its preset name)."""
    state = read_state(path)
    try:
        cfg = sizes(state, variant, image_size)
    except KeyError as e:
        fail(f"{path} lacks {e}, which sets the model's size: not an official {variant} checkpoint")
    model = build(preset_name(cfg, variant), variant, **cfg)
    mapped = to_fastmf_names(state, variant)
    expected = dict(model.named_parameters())
    missing, unknown = sorted(set(expected) - set(mapped)), sorted(set(mapped) - set(expected))
    if missing or unknown:
        fail(f"{path} does not map onto MiT: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
             f"unknown {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    bad = [k for k in expected if mapped[k].shape != expected[k].shape]
    if bad:
        fail(f"{path}: {bad[0]} is {tuple(mapped[bad[0]].shape)}, MiT expects {tuple(expected[bad[0]].shape)}")
    model.load_state_dict(mapped, strict=False)  # the non-persistent tables are fastmf's own
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=["imf", "pmf"], help="which official code wrote the checkpoint")
    p.add_argument("pth", type=Path, help="the official torch-branch .pth")
    p.add_argument("out", type=Path, help="output folder (gets ckpt_0000000.safetensors)")
    p.add_argument("--image-size", type=int, default=None, help="iMF: the input size (32 for 256 px latents)")
    args = p.parse_args(argv)
    if not args.pth.is_file():
        fail(f"no file {args.pth}")
    model = convert(args.variant, args.pth, args.image_size)
    params = {k: v.detach() for k, v in model.named_parameters()}
    meta = {"model": model.record, "world_size": 1, "converted_from": str(args.pth), "state": {"step": 0}}
    if args.variant == "imf":  # iMF's latents are per-channel normalised SD-VAE latents: decoding needs it
        meta["latent_norm"] = {"kind": "channel", "mean": IMF_MEAN, "std": IMF_STD}
    try:
        save_checkpoint(checkpoint_path(args.out, 0), flatten_state({"params": params, "ema": params}), meta)
    except OSError as e:  # a full disk or a folder that cannot be made
        fail(f"cannot write {checkpoint_path(args.out, 0)} ({e.strerror or e})")
    n = sum(v.numel() for v in params.values())
    print(f"{args.variant} {model.record['name']}-sized MiT ({n / 1e6:.1f}M params) -> {checkpoint_path(args.out, 0)}")


if __name__ == "__main__":
    sys.exit(main())
