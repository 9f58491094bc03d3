"""`prunescope export FOLDER --gguf`: the exported model in other tools' formats (GGUF for llama.cpp)."""

from __future__ import annotations

from pathlib import Path

GGUF_TYPES = ("f32", "f16", "q8_0")  # engine.gguf_export.GGUF_TYPES (kept torch-free for --help)


def register(sub) -> None:
    p = sub.add_parser("export", help="write an exported model as GGUF (llama.cpp, Ollama) and check it reloads",
                       description="Writes the GGUF file of an exported model folder (or a run folder's model/) "
                                   "with the gguf package's GGUFWriter, reloads it with transformers' gguf_file= "
                                   "loader and compares its logits with the safetensors weights. The result is "
                                   "recorded in the folder (prunescope_gguf.json) and its model card.")
    p.add_argument("folder", help="an exported model folder, or a run folder holding model/")
    p.add_argument("--gguf", action="store_true", help="write a GGUF file (the only format so far)")
    p.add_argument("--gguf-type", default="f16", choices=GGUF_TYPES,
                   help="f16 (default; 2-D weights in f16), f32, or q8_0 (8-bit blocks of 32 where rows allow)")
    p.add_argument("--out", default=None, metavar="FILE.gguf",
                   help="where to write (default: <folder>-<type>.gguf beside the folder)")
    p.add_argument("--no-verify", action="store_true", help="skip the reload and logit comparison")
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.errors import UserError

    if not args.gguf:
        raise UserError("say which format to write: --gguf (the exported folder itself is already a "
                        "Hugging Face checkpoint)")
    folder = Path(args.folder).expanduser()
    if not (folder / "config.json").is_file() and (folder / "model" / "config.json").is_file():
        folder = folder / "model"  # a run folder
    from engine.gguf_export import export_gguf

    info = export_gguf(folder, args.gguf_type, out=args.out, verify=not args.no_verify)
    st = info.get("safetensors_bytes") or 0
    print(f"wrote {info['path']} ({info['type']}, {info['bytes'] / 1e6:.1f} MB"
          + (f", {100 * info['bytes'] / st:.0f}% of the safetensors weights" if st else "") + ")")
    print("tensor types: " + ", ".join(f"{k} {v}" for k, v in sorted(info["tensor_types"].items())))
    c = info.get("check")
    if c:
        print(f"reload check passed: max |logit diff| {c['max_abs_diff']:.3g} ({c['rel_diff']:.2g} of max |logit|"
              + (f", tolerance {c['tolerance']:g}" if c.get("tolerance") else ", no tolerance for this type")
              + f"), argmax agreement {100 * c['argmax_agreement']:.1f}%, tokenizer identical")
    return 0
