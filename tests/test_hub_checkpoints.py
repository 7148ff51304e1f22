"""The seeds' models as their hub repositories hold them, in a temporary Hugging Face cache.

skt/kogpt2-base-v2 (seeds 000, 001): config.json, a Metaspace BPE tokenizer.json without a post-processor, and
a pytorch_model.bin that torch.save wrote with the uint8 causal-mask buffers. gpt2-xl (seed 003): a byte-level
BPE tokenizer.json with vocab.json and merges.txt, and model.safetensors. Both tiny, with random weights drawn
wide enough that the next-token distributions are far from flat.
"""

import fnmatch
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from safetensors.numpy import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tokenizers.implementations import ByteLevelBPETokenizer
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import tfgen.model
from test_torch_pickle import malicious_checkpoints
from tfgen import GPT2LM, Tokenizer, checkpoint, cli
from tfgen.torch_pickle import UnsafePickleError

KOGPT2 = "skt/kogpt2-base-v2"
GPT2_XL = "gpt2-xl"
KOGPT2_SPECIAL_TOKENS = ["<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>"]
ENGLISH = [
    "Transformers are the most popular toy line in the world.",
    "The researchers were surprised to find it.",
    "In a shocking finding, scientist discovered a herd of unicorns living in a remote valley.",
] * 20
SIZES = {"n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 64, "n_ctx": 64}


def kogpt2_config(vocab_size):
    """KoGPT2-v2's config.json, with tiny sizes."""
    return {
        "_num_labels": 1,
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "author": "Heewon Jeon(madjakarta@gmail.com)",
        "bos_token_id": 0,
        "created": "2021-04-28",
        "embd_pdrop": 0.1,
        "eos_token_id": 1,
        "gradient_checkpointing": False,
        "id2label": {"0": "LABEL_0"},
        "initializer_range": 0.02,
        "label2id": {"LABEL_0": 0},
        "layer_norm_epsilon": 1e-05,
        "license": "CC-BY-NC-SA 4.0",
        "model_type": "gpt2",
        "n_inner": None,
        "pad_token_id": 3,
        "resid_pdrop": 0.1,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "transformers_version": "4.3.3",
        "use_cache": True,
        "vocab_size": vocab_size,
        **SIZES,
    }


def gpt2_xl_config(vocab_size, endoftext_id):
    """gpt2-xl's config.json, with tiny sizes."""
    return {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": endoftext_id,
        "embd_pdrop": 0.1,
        "eos_token_id": endoftext_id,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "output_past": True,
        "resid_pdrop": 0.1,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": vocab_size,
        **SIZES,
    }


def random_torch_model(config, seed):
    """transformers' PyTorch GPT-2 with weights drawn at std 0.3 (not 0.02), so greedy steps are clear-cut."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**config, "initializer_range": 0.3})).eval()


def with_old_mask_buffers(state_dict, config):
    """The state dict as GPT-2 checkpoints of KoGPT2-v2's time held it: uint8 attn.bias, float attn.masked_bias."""
    n = config["n_positions"]
    state_dict = dict(state_dict)
    for layer in range(config["n_layer"]):
        state_dict[f"transformer.h.{layer}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(
            1, 1, n, n
        )
        state_dict[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    return state_dict


def torch_saved(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


def put_in_hub_cache(hub_cache, repo_id, files):
    """Writes `files` (name -> bytes) as huggingface_hub caches a snapshot: blobs, snapshot links, refs/main."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def kogpt2_tokenizer_json(lines):
    tokenizer = HFTokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=KOGPT2_SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer.to_str().encode()


def gpt2_tokenizer_files(lines, directory):
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(lines, vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer.save_model(str(directory))
    return (
        {
            "tokenizer.json": tokenizer._tokenizer.to_str().encode(),
            "vocab.json": (directory / "vocab.json").read_bytes(),
            "merges.txt": (directory / "merges.txt").read_bytes(),
            "tokenizer_config.json": b'{"model_max_length": 1024}',
        },
        tokenizer.token_to_id("<|endoftext|>"),
        tokenizer.get_vocab_size(),
    )


@pytest.fixture(scope="module")
def hub_cache(ko_lines, tmp_path_factory):
    """HF_HOME with KoGPT2-v2- and gpt2-xl-shaped snapshots; yields (hf_home, {repo: snapshot dir})."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    hub = hf_home / "hub"
    tokenizer_json = kogpt2_tokenizer_json(ko_lines)
    config = kogpt2_config(json.loads(tokenizer_json)["model"]["vocab"].__len__())
    state_dict = with_old_mask_buffers(random_torch_model(config, seed=0).state_dict(), config)
    kogpt2 = put_in_hub_cache(
        hub,
        KOGPT2,
        {
            "config.json": json.dumps(config).encode(),
            "tokenizer.json": tokenizer_json,
            "pytorch_model.bin": torch_saved(state_dict),
            "README.md": b"---\nlanguage: ko\nlicense: cc-by-nc-sa-4.0\n---\n# KoGPT2 (tiny test copy)\n",
        },
    )

    files, endoftext, vocab_size = gpt2_tokenizer_files(ENGLISH + ko_lines[:300], tmp_path_factory.mktemp("bpe"))
    config = gpt2_xl_config(vocab_size, endoftext)
    # gpt2-xl's weights are a GPT2Model's: no "transformer." prefix, no lm_head (tied to wte).
    weights = {
        name.removeprefix("transformer."): tensor.numpy()
        for name, tensor in random_torch_model(config, seed=1).state_dict().items()
        if name != "lm_head.weight"
    }
    gpt2_xl = put_in_hub_cache(
        hub,
        GPT2_XL,
        {
            **files,
            "config.json": json.dumps(config).encode(),
            "generation_config.json": json.dumps({"bos_token_id": endoftext, "eos_token_id": endoftext}).encode(),
            "model.safetensors": _safetensors_bytes(weights, tmp_path_factory.mktemp("st")),
        },
    )
    return hf_home, {KOGPT2: kogpt2, GPT2_XL: gpt2_xl}


def _safetensors_bytes(weights, directory):
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return (directory / "model.safetensors").read_bytes()


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    """This process's hub client pointed at the temporary cache, offline (its settings are read at import)."""
    hf_home, snapshots = hub_cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshots


def _torch_logits(snapshot, ids):
    model = GPT2LMHeadModel.from_pretrained(snapshot).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


# Runs where torch cannot be imported: loads the KoGPT2-v2 snapshot offline, prints its logits, runs the CLI,
# and tries the malicious checkpoints given as arguments.
WITHOUT_TORCH = """
import json, sys
import numpy as np
sys.modules["torch"] = None  # `import torch` now raises ImportError; transformers sees no torch
try:
    import torch
    blocked = False
except ImportError:
    blocked = True
from tfgen import GPT2LM
from tfgen.cli import main
from tfgen.torch_pickle import TorchCheckpoint, UnsafePickleError

lm = GPT2LM.from_pretrained(sys.argv[1])
ids = [lm.tokenizer.encode(text) for text in json.loads(sys.argv[2])]
refused = []
for path in sys.argv[3:]:
    try:
        TorchCheckpoint(path)
    except UnsafePickleError as error:
        refused.append(str(error))
print(json.dumps({"blocked": blocked, "ids": ids, "logits": [lm(np.array([row], np.int32)).numpy()[0].tolist() for row in ids],
                  "refused": refused}))
sys.exit(main(["generate", "--model", sys.argv[1], "--json", "--max-new-tokens", "12", *json.loads(sys.argv[2])]))
"""
PROMPTS = ["안녕하세요", "근육이 커지기 위해서는"]


def test_kogpt2_loads_offline_and_generates_in_a_process_without_torch(hub_cache, tmp_path):
    hf_home, snapshots = hub_cache
    marker = tmp_path / "ran"
    evil = [str(path) for path in malicious_checkpoints(tmp_path, marker)]
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, KOGPT2, json.dumps(PROMPTS, ensure_ascii=False), *evil],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    result = json.loads(lines[-len(PROMPTS) - 1])
    assert result["blocked"]
    fast = PreTrainedTokenizerFast.from_pretrained(snapshots[KOGPT2], eos_token="</s>")
    model = GPT2LMHeadModel.from_pretrained(snapshots[KOGPT2]).eval()
    for prompt, ids, logits, line in zip(PROMPTS, result["ids"], result["logits"], lines[-len(PROMPTS) :]):
        assert ids == fast.encode(prompt)  # no BOS: the file's post-processor adds none
        np.testing.assert_allclose(np.array(logits), _torch_logits(snapshots[KOGPT2], [ids])[0], atol=1e-4)
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, pad_token_id=3)
        new = expected[0, len(ids) :].tolist()
        new = new[: new.index(1) + 1] if 1 in new else new  # the CLI's new tokens run through EOS
        assert json.loads(line)["token_ids"] == [new]
    assert len(result["refused"]) == len(evil) and not marker.exists()


def test_seed_000_greedy_flow_matches_pytorch_token_for_token(offline_hub):
    text = "안녕하세요"
    lm = GPT2LM.from_pretrained(KOGPT2, eos_token="</s>")
    fast = PreTrainedTokenizerFast.from_pretrained(offline_hub[KOGPT2], eos_token="</s>")
    input_ids = lm.tokenizer.encode(text)
    assert input_ids == fast.encode(text)
    model = GPT2LMHeadModel.from_pretrained(offline_hub[KOGPT2]).eval()
    with torch.no_grad():
        expected = model.generate(torch.tensor([input_ids]), do_sample=False, min_length=10, max_length=50)
    ours = lm.generate(input_ids, do_sample=False, min_length=10, max_length=50).numpy()
    np.testing.assert_array_equal(ours, expected.numpy())
    assert lm.tokenizer.decode(ours[0]) == fast.decode(expected[0], skip_special_tokens=True)


def test_seed_003_top_choices_equal_the_hand_computation(offline_hub):
    lm = GPT2LM.from_pretrained(GPT2_XL)
    tokenizer = AutoTokenizer.from_pretrained(offline_hub[GPT2_XL])
    model = GPT2LMHeadModel.from_pretrained(offline_hub[GPT2_XL]).eval()
    # Seed 003's loop: eight greedy steps, the top five next tokens as tokenizer.decode shows them.
    input_ids = tokenizer("Transformers are the", return_tensors="pt").input_ids
    expected = []
    with torch.no_grad():
        for _ in range(8):
            probs = torch.softmax(model(input_ids=input_ids).logits[0, -1, :], dim=-1)
            order = torch.argsort(probs, dim=-1, descending=True)
            # top_choices' "input" leaves out special tokens (this random model picks <|endoftext|>; gpt2-xl does not).
            text = tokenizer.decode(input_ids[0], skip_special_tokens=True)
            expected.append((text, [(tokenizer.decode(t), float(probs[t])) for t in order[:5]]))
            input_ids = torch.cat([input_ids, order[None, 0, None]], dim=-1)
    table = lm.top_choices("Transformers are the", steps=8, k=5)
    assert lm.tokenizer.encode("Transformers are the") == tokenizer("Transformers are the").input_ids
    for row, (text, choices) in zip(table, expected):
        assert row["input"] == text
        for (ours, p), (theirs, q) in zip(row["choices"], choices):
            # A token that is only part of a character decodes to U+FFFD there; ours spells its bytes.
            assert ours == theirs if "\ufffd" not in theirs else ("<0x" in ours and "\ufffd" not in ours)
            assert p == pytest.approx(q, abs=1e-5)


def test_token_texts_are_what_decode_shows(offline_hub, spm_dir):
    gpt2 = Tokenizer.from_pretrained(offline_hub[GPT2_XL])
    gpt2_fast = AutoTokenizer.from_pretrained(offline_hub[GPT2_XL])
    assert (gpt2.bos_token, gpt2.eos_token, gpt2.unk_token) == ("<|endoftext|>",) * 3
    partial = 0
    for token_id in range(gpt2.vocab_size):
        decoded, text = gpt2_fast.decode([token_id]), gpt2.token_text(token_id)
        if "\ufffd" in decoded:
            partial += 1
            assert "\ufffd" not in text and "<0x" in text, (token_id, text)
        else:
            assert text == decoded
    assert partial > 0  # the byte alphabet's non-ASCII bytes
    korean = "안녕하세요"
    ids = gpt2.encode(korean)
    assert ids == gpt2_fast.encode(korean)
    whole = [gpt2.token_text(i) for i in ids if "<0x" not in gpt2.token_text(i)]
    assert all(text in korean for text in whole)

    kogpt2 = Tokenizer.from_pretrained(offline_hub[KOGPT2])
    kogpt2_fast = PreTrainedTokenizerFast.from_pretrained(offline_hub[KOGPT2])
    for token_id in kogpt2.encode("근육이 커지기 위해서는 운동을"):
        piece = kogpt2.id_to_token(token_id)
        # Metaspace's decoder drops the word-start space of a text's first token; the token text keeps it.
        expected = " " + kogpt2_fast.decode([token_id]) if piece.startswith("▁") else kogpt2_fast.decode([token_id])
        assert kogpt2.token_text(token_id) == expected
    sp = Tokenizer.from_pretrained(spm_dir)
    byte_piece = next(i for i in range(sp.vocab_size) if sp.id_to_token(i).startswith("<0x"))
    assert sp.token_text(byte_piece) == sp.id_to_token(byte_piece)
    assert sp.token_text(sp.bos_token_id) == "<s>"


def test_special_token_overrides_reach_the_model(offline_hub):
    lm = GPT2LM.from_pretrained(
        KOGPT2, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>"
    )
    fast = PreTrainedTokenizerFast.from_pretrained(
        offline_hub[KOGPT2],
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token"):
        assert getattr(lm.tokenizer, f"{key}_id") == getattr(fast, f"{key}_id")
    assert (lm.config.bos_token_id, lm.config.eos_token_id, lm.config.pad_token_id) == (1, 1, 3)
    with pytest.raises(ValueError, match="pad_token '<PAD>' is not in the vocabulary"):
        GPT2LM.from_pretrained(KOGPT2, pad_token="<PAD>")


def test_score_and_cli_show_token_texts(offline_hub, capsys):
    text = "Transformers are the most"
    lm = GPT2LM.from_pretrained(GPT2_XL)
    fast = AutoTokenizer.from_pretrained(offline_hub[GPT2_XL])
    result = lm.score(text)
    assert result["tokens"] == [fast.decode([i]) for i in fast.encode(text)]  # ' are', not 'Ġare'
    assert "".join(result["tokens"]) == text
    assert cli.main(["score", "--model", GPT2_XL, "--json", text]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == result["tokens"]
    assert cli.main(["score", "--model", GPT2_XL, text]) == 0
    assert "  ▁are  " in capsys.readouterr().out  # the plain listing marks a leading space with ▁


def test_a_hub_id_downloads_only_what_it_reads_and_falls_back_to_the_cache(hub_cache, monkeypatch):
    import huggingface_hub
    import requests

    hf_home, snapshots = hub_cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    listing = [
        ".gitattributes",
        "config.json",
        "flax_model.msgpack",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "pytorch_model.bin",
        "rust_model.ot",
        "tf_model.h5",
        "tokenizer.json",
        "vocab.json",
    ]
    requested = []

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False):
        requested.append(allow_patterns)
        return str(snapshots[repo_id])

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id: listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert tfgen.model.resolve_model_dir(GPT2_XL) == snapshots[GPT2_XL]
    (patterns,) = requested
    fetched = [name for name in listing if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]
    assert fetched == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]

    monkeypatch.undo()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(self, repo_id):
        raise requests.ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    assert tfgen.model.resolve_model_dir(KOGPT2) == snapshots[KOGPT2]  # the cached snapshot
    with pytest.raises(OSError, match="could not fetch 'skt/not-cached'.*no route"):
        tfgen.model.resolve_model_dir("skt/not-cached")


def _weights(lm):
    return [variable.numpy() for variable in lm.gpt2.weights]


def test_sharded_bin_and_safetensors_load_the_same_weights_as_unsharded(offline_hub, tmp_path):
    unsharded = GPT2LM.from_pretrained(KOGPT2)
    model = GPT2LMHeadModel.from_pretrained(offline_hub[KOGPT2])
    for safe in (False, True):
        directory = tmp_path / f"sharded-{safe}"
        model.save_pretrained(directory, safe_serialization=safe, max_shard_size="100KB")
        index = checkpoint.SAFETENSORS_INDEX_FILE if safe else checkpoint.PYTORCH_INDEX_FILE
        names = sorted(path.name for path in directory.iterdir())
        assert index in names and len(names) > 4, names  # config, generation config, index and several shards
        sharded = GPT2LM.from_pretrained(directory)
        for ours, theirs in zip(_weights(sharded), _weights(unsharded)):
            np.testing.assert_array_equal(ours, theirs)


def test_a_missing_weight_is_an_error_naming_it(offline_hub, tmp_path):
    state_dict = torch.load(offline_hub[KOGPT2] / "pytorch_model.bin", weights_only=True)
    del state_dict["transformer.h.1.mlp.c_fc.weight"]
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((offline_hub[KOGPT2] / name).read_bytes())
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"lacks the weights transformer\.h\.1\.mlp\.c_fc\.weight"):
        GPT2LM.from_pretrained(tmp_path)


def test_a_malicious_pytorch_model_bin_is_refused_by_from_pretrained(offline_hub, tmp_path):
    marker = tmp_path / "ran"
    path = malicious_checkpoints(tmp_path, marker)[0]
    (path.parent / "config.json").write_bytes((offline_hub[KOGPT2] / "config.json").read_bytes())
    with pytest.raises(UnsafePickleError, match="pytorch_model.bin"):
        GPT2LM.from_pretrained(path.parent)
    assert not marker.exists()


@pytest.mark.parametrize(
    "repo_files, expected",
    [
        # gpt2-xl's main branch: every format; the safetensors file is the one read.
        (
            [
                ".gitattributes",
                "README.md",
                "config.json",
                "flax_model.msgpack",
                "generation_config.json",
                "merges.txt",
                "model.safetensors",
                "pytorch_model.bin",
                "rust_model.ot",
                "tf_model.h5",
                "tokenizer.json",
                "vocab.json",
            ],
            ["model.safetensors"],
        ),
        # skt/kogpt2-base-v2's main branch.
        (
            [".gitattributes", "README.md", "config.json", "flax_model.msgpack", "pytorch_model.bin", "tokenizer.json"],
            ["pytorch_model.bin"],
        ),
        (["config.json", "tf_model.h5", "pytorch_model.bin"], ["tf_model.h5"]),
        (
            [
                "config.json",
                "pytorch_model.bin.index.json",
                "pytorch_model-00001-of-00002.bin",
                "pytorch_model-00002-of-00002.bin",
            ],
            ["pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"],
        ),
        (
            [
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "pytorch_model.bin.index.json",
                "pytorch_model-00001-of-00002.bin",
            ],
            ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
        ),
    ],
)
def test_a_hub_download_fetches_only_the_weights_that_will_be_read(repo_files, expected):
    assert checkpoint.weights_to_fetch(repo_files) == expected
