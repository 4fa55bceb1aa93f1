"""What users bring, checked against the tool they made it with: tokenizers' own bos/eos conventions and Hugging Face
Jinja chat templates, against transformers (AutoTokenizer, apply_chat_template, generate).

Six tokenizers are built here: sentencepiece with add_bos_token true and false, a Baichuan-style one (sentencepiece
without a dummy prefix, read by its own remote-code class, add_bos_token false), byte-level BPE tokenizer.json with
and without a bos post-processor, and a ChatML-style one whose bos is a chat marker the tokenizer never adds.

    python -m pytest -q tests/test_bring_your_own.py
"""

import contextlib
import io
import json
import shutil

import pytest
import torch

import prepare
import sample
from test_prepare import TEMPLATES_TEXT, run, sentences

TEXTS = ["The capital of France is", "Hello world.  Two  spaces\nand a new line", "what is 42?"]

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-2-chat's published template (bos per exchange, <<SYS>> inside the first user turn)
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
          "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
          "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")
# Zephyr's: a system turn of its own, every turn closed by eos
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
          "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
# the same templates with the reply and its closing token marked as transformers' assistant masks expect
MARKED = {
    "chatml": CHATML.replace("{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
                             "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
                             "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
                             "{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"),
    "llama-2": LLAMA2.replace("{{ ' '  + content.strip() + ' ' + eos_token }}",
                              "{% generation %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endgeneration %}"),
    "zephyr": ZEPHYR.replace("{{ '<|assistant|>\n'  + message['content'] + eos_token }}",
                             "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}"
                             "{% endgeneration %}{{ '' }}"),  # trim_blocks would eat the newline after a block tag
}
CONV = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, the city."}]

# A Baichuan-style remote tokenizer class (what trust_remote_code loads for Baichuan): the sentencepiece model as it
# is, bos/eos as add_bos_token/add_eos_token say.
BAICHUAN_TOKENIZER = '''
import sentencepiece as spm
from transformers.tokenization_utils import PreTrainedTokenizer


class BaichuanTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, add_bos_token=True, add_eos_token=False, **kwargs):
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        self.vocab_file, self.add_bos_token, self.add_eos_token = vocab_file, add_bos_token, add_eos_token
        super().__init__(add_bos_token=add_bos_token, add_eos_token=add_eos_token, **kwargs)

    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size()

    def get_vocab(self):
        return {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text):
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens):
        return self.sp_model.decode(tokens)

    def build_inputs_with_special_tokens(self, ids, pair=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        return bos + ids + eos + ([] if pair is None else bos + pair + eos)
'''


def _sentencepiece(out, dummy_prefix=True):
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences(3000) + [TEMPLATES_TEXT] * 20), model_writer=model, vocab_size=400,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=dummy_prefix, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2)
    out.mkdir(parents=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())


def _byte_level_bpe(out, specials, bos_processor=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(sentences(3000) + [TEMPLATES_TEXT] * 20, trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if bos_processor:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos_processor} $A",
                                                          special_tokens=[(bos_processor, specials.index(bos_processor))])
    out.mkdir(parents=True)
    tk.save(str(out / "tokenizer.json"))


def _config(out, **fields):
    (out / "tokenizer_config.json").write_text(json.dumps(fields))


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    """name -> a dir holding the tokenizer files as a published model ships them."""
    root, dirs = tmp_path_factory.mktemp("tokenizers"), {}
    llama = dict(tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    for name, flags in (("sp-bos", dict(add_bos_token=True, add_eos_token=False)),
                        ("sp-eos-no-bos", dict(add_bos_token=False, add_eos_token=True))):
        _sentencepiece(root / name)
        _config(root / name, **llama, **flags)
        dirs[name] = root / name
    _sentencepiece(root / "baichuan", dummy_prefix=False)
    _config(root / "baichuan", tokenizer_class="BaichuanTokenizer", add_bos_token=False, add_eos_token=False,
            auto_map={"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]}, bos_token="<s>",
            eos_token="</s>", pad_token="<unk>", unk_token="<unk>")
    (root / "baichuan" / "tokenization_baichuan.py").write_text(BAICHUAN_TOKENIZER)
    dirs["baichuan"] = root / "baichuan"
    # the config's add_bos_token is not what decides for a tokenizer.json: its post-processor is
    _byte_level_bpe(root / "bpe-bos", ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"], "<s>")
    _config(root / "bpe-bos", tokenizer_class="PreTrainedTokenizerFast", bos_token="<s>", eos_token="</s>",
            add_bos_token=False)
    _byte_level_bpe(root / "bpe-plain", ["<unk>", "<s>", "</s>"])
    _config(root / "bpe-plain", tokenizer_class="PreTrainedTokenizerFast", bos_token="<s>", eos_token="</s>",
            add_bos_token=True)
    _byte_level_bpe(root / "chatml", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    _config(root / "chatml", tokenizer_class="PreTrainedTokenizerFast", bos_token="<|im_start|>",
            eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML)
    dirs.update({n: root / n for n in ("bpe-bos", "bpe-plain", "chatml")})
    return dirs


def hf_tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)


TOKENIZERS = ["sp-bos", "sp-eos-no-bos", "baichuan", "bpe-bos", "bpe-plain", "chatml"]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_plain_text_ids_equal_transformers(tokenizers, name):
    theirs, ours = hf_tokenizer(tokenizers[name]), prepare.load_tokenizer(tokenizers[name])
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=True) == theirs(text).input_ids, text


@pytest.mark.parametrize("name", TOKENIZERS)
def test_text_documents_are_framed_as_the_tokenizer_frames_text_and_end_with_eos(tokenizers, name, tmp_path):
    theirs = hf_tokenizer(tokenizers[name])
    (tmp_path / "doc.txt").write_text(TEXTS[0])
    meta = run("--input", tmp_path / "doc.txt", "--tokenizer", tokenizers[name], "--val_fraction", 0,
               "--out", tmp_path / "data")
    tokens = list(map(int, __import__("numpy").fromfile(tmp_path / "data" / "train.bin", meta["dtype"])))
    want = theirs(TEXTS[0]).input_ids
    assert tokens == want + ([] if want[-1] == theirs.eos_token_id else [theirs.eos_token_id])


def hf_model_dir(tokenizer_dir, dst):
    """A tiny LLaMA saved by transformers beside the tokenizer files, as a published model dir looks."""
    from transformers import LlamaConfig, LlamaForCausalLM
    theirs = hf_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(theirs), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128, initializer_range=0.2,
                      bos_token_id=theirs.bos_token_id, eos_token_id=theirs.eos_token_id, pad_token_id=None)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(dst)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, dst / f.name)
    return hf, theirs


def recorded_generate(monkeypatch):
    """Wrap sample.generate: record each prompt and the tokens it yields."""
    calls, real = [], sample.generate

    def generate(model, prompt_ids, *args, **kwargs):
        calls.append((list(prompt_ids), []))
        for t in real(model, prompt_ids, *args, **kwargs):
            calls[-1][1].append(int(t))
            yield t
    monkeypatch.setattr(sample, "generate", generate)
    return calls


@pytest.mark.parametrize("name", TOKENIZERS)
def test_sample_greedy_equals_transformers_generate(tokenizers, name, tmp_path, monkeypatch):
    import convert
    hf, theirs = hf_model_dir(tokenizers[name], tmp_path / "hf")
    convert.main(["hf-to-native", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "ckpt")])
    calls = recorded_generate(monkeypatch)
    prompt = TEXTS[0]
    sample.main(["--ckpt", str(tmp_path / "ckpt"), "--prompt", prompt, "--temperature", "0",
                 "--max_new_tokens", "12"], stdout=io.StringIO())
    ids = theirs(prompt, return_tensors="pt").input_ids
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                      pad_token_id=theirs.eos_token_id)
    [(prompt_ids, new)] = calls
    assert prompt_ids == ids[0].tolist()
    assert new == out[0, ids.size(1):].tolist()


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face chat templates

def apply_chat_template(theirs, template, messages, **kw):
    out = theirs.apply_chat_template(messages, chat_template=template, tokenize=True, **kw)
    return out if isinstance(out, list) else dict(out)


TEMPLATE_CASES = {"chatml": ("chatml", CHATML), "llama-2": ("sp-bos", LLAMA2), "zephyr": ("bpe-bos", ZEPHYR)}


def with_template(tokenizers, name, template, tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(tokenizers[name], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    _config(d, **{**cfg, "chat_template": template})
    return d


@pytest.mark.parametrize("case", sorted(TEMPLATE_CASES))
def test_chat_template_ids_equal_apply_chat_template(tokenizers, case, tmp_path):
    name, template = TEMPLATE_CASES[case]
    d = with_template(tokenizers, name, template, tmp_path)
    theirs, ours = hf_tokenizer(d), prepare.load_tokenizer(d)
    for messages, gen in ((CONV, False), (CONV[:4], True), (CONV[1:4], True)):
        want = apply_chat_template(theirs, template, messages, add_generation_prompt=gen, return_dict=False)
        assert prepare.encode_chat(ours, "hf", messages, add_generation_prompt=gen)[0] == want


@pytest.mark.parametrize("case", sorted(TEMPLATE_CASES))
def test_chat_template_mask_is_exactly_the_replies_and_their_end_token(tokenizers, case, tmp_path):
    # transformers' assistant mask of the template with {% generation %} around each reply and its closing token is
    # the reference; ours must give it from the plain template (growing prefixes) and from the marked one
    name, template = TEMPLATE_CASES[case]
    d = with_template(tokenizers, name, template, tmp_path)
    theirs, ours = hf_tokenizer(d), prepare.load_tokenizer(d)
    ref = apply_chat_template(theirs, MARKED[case], CONV, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = prepare.encode_chat(ours, "hf", CONV)
    assert ids == ref["input_ids"] and mask == ref["assistant_masks"] and sum(mask) > 4
    ours.chat_template = MARKED[case]
    assert prepare.encode_chat(ours, "hf", CONV) == (ref["input_ids"], ref["assistant_masks"])
    replies = theirs.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert "Paris." in replies and "Rome, the city." in replies and "France" not in replies


def test_convert_keeps_the_shipped_template_and_chat_renders_it(tokenizers, tmp_path, monkeypatch):
    import convert
    hf, theirs = hf_model_dir(tokenizers["chatml"], tmp_path / "hf")
    convert.main(["hf-to-native", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "ckpt")])
    assert json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    calls, out = recorded_generate(monkeypatch), io.StringIO()
    sample.main(["--ckpt", str(tmp_path / "ckpt"), "--chat", "--system", CONV[0]["content"], "--temperature", "0",
                 "--max_new_tokens", "6"], stdin=io.StringIO("Hi there\nAnd again?\n"), stdout=out)
    first, second = calls
    assert first[0] == apply_chat_template(theirs, None, [CONV[0], {"role": "user", "content": "Hi there"}],
                                           add_generation_prompt=True, return_dict=False)
    reply = out.getvalue().splitlines()[0]  # the reply as printed goes into the history
    history = [CONV[0], {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": reply.strip()},
               {"role": "user", "content": "And again?"}]
    assert second[0] == apply_chat_template(theirs, None, history, add_generation_prompt=True, return_dict=False)
    # exported again, transformers reads the same template and bos/eos conventions
    convert.main(["native-to-hf", "--src", str(tmp_path / "ckpt"), "--dst", str(tmp_path / "back")])
    back = hf_tokenizer(tmp_path / "back")
    assert back.chat_template == CHATML and back(TEXTS[0]).input_ids == theirs(TEXTS[0]).input_ids


def test_chat_stops_at_the_templates_end_of_turn_token(tokenizers):
    ours = prepare.load_tokenizer(tokenizers["chatml"])
    ours.eos_id = ours.token_to_id("<|endoftext|>")  # a model whose eos is not the end-of-turn marker
    assert prepare.jinja_turn_end(ours) == ours.token_to_id("<|im_end|>")
    assert ours.token_to_id("<|im_end|>") in sample.chat_end_ids(ours, "hf")


def test_sentencepiece_llama_export_keeps_bos_in_transformers(tokenizers, tmp_path):
    # transformers reads a bare tokenizer.model as "no bos": the export must say add_bos_token
    import convert
    hf_model_dir(tokenizers["sp-bos"], tmp_path / "hf")
    convert.main(["hf-to-native", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "ckpt")])
    convert.main(["native-to-hf", "--src", str(tmp_path / "ckpt"), "--dst", str(tmp_path / "back")])
    assert hf_tokenizer(tmp_path / "back")(TEXTS[0]).input_ids == hf_tokenizer(tokenizers["sp-bos"])(TEXTS[0]).input_ids


def test_fine_tuning_refuses_data_prepared_with_another_tokenizer(tokenizers, tmp_path):
    # both vocabularies fit the model: only the tokenizers themselves tell the mistake, which would otherwise train
    # on ids that mean other pieces and export the data's tokenizer beside the model
    import convert
    import train
    hf_model_dir(tokenizers["bpe-plain"], tmp_path / "hf")
    convert.main(["hf-to-native", "--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "ckpt")])
    (tmp_path / "docs").mkdir()
    for i in range(10):
        (tmp_path / "docs" / f"{i}.txt").write_text(" ".join(TEXTS * 4))
    argv = ["--seq_len=16", "--micro_batch_size=2", "--global_batch_size=2", "--max_iters=1", "--eval_iters=1",
            "--peak_flops=1e9", f"--init_from={tmp_path / 'ckpt'}"]
    for name, source in (("own", tokenizers["bpe-plain"]), ("other", tokenizers["sp-bos"])):
        run("--input", tmp_path / "docs", "--tokenizer", source, "--val_fraction", 0.2, "--out", tmp_path / name)
    train.main(argv + [f"--data_dir={tmp_path / 'own'}", f"--out_dir={tmp_path / 'out_own'}"])
    with pytest.raises(SystemExit, match=r"train.py: data_dir=.*other: prepared with another tokenizer than "
                                         r"init_from=.*ckpt's .*--tokenizer="):
        train.main(argv + [f"--data_dir={tmp_path / 'other'}", f"--out_dir={tmp_path / 'out_other'}"])
    assert not (tmp_path / "out_other").exists()


def test_a_hugging_face_dir_given_for_a_checkpoint_dir_says_to_convert_it(tokenizers, tmp_path):
    # its config.json has none of our fields: read as one, it was a default-sized model (llama-7b's shape)
    import train
    hf_model_dir(tokenizers["bpe-plain"], tmp_path / "hf")
    (tmp_path / "docs").mkdir()
    for i in range(10):
        (tmp_path / "docs" / f"{i}.txt").write_text(" ".join(TEXTS * 4))
    run("--input", tmp_path / "docs", "--tokenizer", tmp_path / "hf", "--val_fraction", 0.2, "--out", tmp_path / "d")
    want = r"hf/config.json: a Hugging Face config \(model_type 'llama'\), not a checkpoint dir's: convert it first: " \
           r"python convert.py hf-to-native --src .*hf --dst "
    with pytest.raises(SystemExit, match="train.py: init_from: .*" + want):
        train.main([f"--init_from={tmp_path / 'hf'}", f"--data_dir={tmp_path / 'd'}", f"--out_dir={tmp_path / 'o'}"])
    with pytest.raises(SystemExit, match="sample.py: .*" + want):
        sample.main([f"--ckpt={tmp_path / 'hf'}", "--prompt=Hi", "--max_new_tokens=2"])


def test_prepare_renders_training_conversations_with_the_models_template(tokenizers, tmp_path):
    rec = {"conversations": [{"from": "system", "value": CONV[0]["content"]}] +
           [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in CONV[1:]]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(rec) + "\n")
    theirs = hf_tokenizer(tokenizers["chatml"])
    ref = apply_chat_template(theirs, MARKED["chatml"], CONV, return_dict=True, return_assistant_tokens_mask=True)
    for extra in ([], ["--template", "hf"]):  # the tokenizer's own template is the default
        out = tmp_path / f"data{len(extra)}"
        meta = run("--input", tmp_path / "chat.jsonl", "--format", "sharegpt", "--tokenizer", tokenizers["chatml"],
                   "--val_fraction", 0, "--out", out, *extra)
        assert meta["template"] == "hf"
        import numpy as np
        tokens, mask = np.fromfile(out / "train.bin", meta["dtype"]), np.fromfile(out / "train.mask.bin", np.uint8)
        eos = theirs.eos_token_id  # the rendered text ends with "\n": the document separator follows, not a target
        assert tokens.tolist() == ref["input_ids"] + [eos] and mask.tolist() == ref["assistant_masks"] + [0]
        assert prepare.load_tokenizer(out).chat_template == CHATML  # the data dir keeps it for train.py / sample.py


def test_train_on_prompt_counts_every_token(tokenizers, tmp_path):
    import numpy as np
    rec = {"instruction": "Name a city.", "input": "", "output": "Paris"}
    (tmp_path / "a.json").write_text(json.dumps([rec]))
    for flag, check in (([], lambda m: 0 < m.sum() < m.size), (["--train_on_prompt"], lambda m: m.all())):
        out = tmp_path / f"d{len(flag)}"
        meta = run("--input", tmp_path / "a.json", "--format", "alpaca", "--tokenizer", tokenizers["sp-bos"],
                   "--template", "human-assistant", "--val_fraction", 0, "--out", out, *flag)
        assert check(np.fromfile(out / "train.mask.bin", np.uint8)) and meta["train_on_prompt"] == bool(flag)


def test_alpaca_data_conversation_prompts_are_not_wrapped_twice(tokenizers, tmp_path):
    import numpy as np
    instruction, output = "Give three tips for staying healthy.", "Eat well, move, sleep."
    raw = {"instruction": instruction, "input": "", "output": output}
    formatted = {"id": "1", "conversations": [  # FastChat's alpaca-data-conversation.json
        {"from": "human", "value": f"{prepare.ALPACA_SYSTEM}\n\n### Instruction:\n{instruction}\n\n### Response:"},
        {"from": "gpt", "value": output}]}
    outs = []
    for i, (rec, fmt) in enumerate(((raw, "alpaca"), (formatted, "sharegpt"))):
        (tmp_path / f"{i}.json").write_text(json.dumps([rec]))
        meta = run("--input", tmp_path / f"{i}.json", "--format", fmt, "--tokenizer", tokenizers["sp-bos"],
                   "--template", "alpaca", "--val_fraction", 0, "--out", tmp_path / f"o{i}")
        outs.append((np.fromfile(tmp_path / f"o{i}" / "train.bin", meta["dtype"]).tolist(),
                     np.fromfile(tmp_path / f"o{i}" / "train.mask.bin", np.uint8).tolist()))
    assert outs[0] == outs[1]  # the formatted prompt is used as it is: the same tokens and mask as the raw record


def test_half_formatted_alpaca_prompt_is_a_one_line_error_naming_the_record(tokenizers, tmp_path):
    rec = {"conversations": [{"from": "human", "value": "### Instruction:\nSay hi."},
                             {"from": "gpt", "value": "hi"}]}
    (tmp_path / "c.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"},
                                                                    {"from": "gpt", "value": "Hello"}]}) + "\n" +
                                      json.dumps(rec) + "\n")
    args = ["--input", tmp_path / "c.jsonl", "--format", "sharegpt", "--tokenizer", tokenizers["sp-bos"],
            "--template", "alpaca", "--val_fraction", 0]
    with pytest.raises(SystemExit, match=r"c\.jsonl: line 2: --template=alpaca: message 0 already holds alpaca "
                                         r"markers .* use --template=vicuna") as e:
        run(*args, "--out", tmp_path / "o")
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()
    meta = run(*args, "--on_error", "skip", "--out", tmp_path / "o2")
    assert meta["train_documents"] == 1 and meta["stats"]["skipped_records"] == 1


@pytest.mark.parametrize("template,message", [
    ("{{ raise_exception('roles must alternate') }}", r"tokenizer_config\.json: chat_template: roles must alternate"),
    ("{% for m in messages %}{{ m.content }", r"tokenizer_config\.json: chat_template: TemplateSyntaxError"),
])
def test_a_template_that_fails_is_a_one_line_error_naming_the_file(tokenizers, tmp_path, template, message):
    d = with_template(tokenizers, "chatml", template, tmp_path)
    (tmp_path / "c.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"},
                                                                    {"from": "gpt", "value": "Hello"}]}) + "\n")
    with pytest.raises(SystemExit, match=message) as e:
        run("--input", tmp_path / "c.jsonl", "--format", "sharegpt", "--tokenizer", d, "--out", tmp_path / "o")
    assert "\n" not in str(e.value)



def test_template_hf_without_a_jinja_template_is_a_one_line_error(tokenizers, tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"},
                                                                    {"from": "gpt", "value": "Hello"}]}) + "\n")
    with pytest.raises(SystemExit, match=r"--template=hf: .*tokenizer_config\.json holds no Jinja chat_template"):
        run("--input", tmp_path / "c.jsonl", "--format", "sharegpt", "--tokenizer", tokenizers["bpe-plain"],
            "--template", "hf", "--out", tmp_path / "o")
    # library code raises; only sample.py's main says it as "sample.py: ..." and exits (tests/test_bad_inputs.py)
    with pytest.raises(sample.SampleError, match=r"^--template=hf: .*holds no Jinja chat_template"):
        sample.resolve_template("hf", prepare.load_tokenizer(tokenizers["bpe-plain"]), "llama")


# --------------------------------------------------------------------------------------------------------------------
# Built-in templates exported as Jinja: transformers' apply_chat_template on the exported dir gives encode_chat's ids

def _reserved_sentencepiece(out, dummy_prefix, kind="control"):
    """Sentencepiece whose ids 195 and 196 are reserved tokens (<reserved_192>, <reserved_193>), as Baichuan's
    vocabularies reserve its user and assistant tokens: control pieces, or user-defined ones as in Baichuan's own
    tokenizer.model (its text "<reserved_102>" encodes to id 195)."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences(3000) + [TEMPLATES_TEXT] * 20), model_writer=model, vocab_size=600,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=dummy_prefix, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        **{f"{kind}_symbols": [f"<reserved_{i}>" for i in range(194)]}, minloglevel=2)
    out.mkdir(parents=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    _config(out, tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            add_bos_token=dummy_prefix)


ALL = set(prepare.TEMPLATES)
NO_BAICHUAN = ALL - {"baichuan", "baichuan2"}  # ids 195/196 are ordinary pieces: no string names them
# tokenizer -> the built-in templates whose Jinja form is exact; the others get none and a warning
EXPORTS = {"sp-bos": NO_BAICHUAN - {"chatml"},  # no <|im_start|> token: spelled out, it tokenizes unlike ours
           "bpe-bos": NO_BAICHUAN, "chatml": NO_BAICHUAN,
           "sp-reserved": ALL - {"chatml"}, "baichuan-reserved": ALL,  # no dummy prefix: spelled out, it is exact
           "baichuan-user-defined": ALL}  # as Baichuan's own tokenizer.model


def test_baichuan_template_warns_where_its_ids_are_ordinary_text(tokenizers, tmp_path):
    """--template=baichuan on a vocabulary whose ids 195/196 are bytes or words says so, in prepare.py and sample.py;
    Baichuan-style vocabularies (reserved control or user-defined pieces there) and templates without literal ids
    pass quietly."""
    for kind in ("control", "user_defined"):
        _reserved_sentencepiece(tmp_path / kind, dummy_prefix=False, kind=kind)
        tok = prepare.load_tokenizer(tmp_path / kind)
        assert tok.id_to_token(195) == "<reserved_192>"
        assert prepare.literal_id_warning(tok, "baichuan2") is None
    for name in ("baichuan", "bpe-bos"):
        tok = prepare.load_tokenizer(tokenizers[name])
        warning = prepare.literal_id_warning(tok, "baichuan")
        assert warning and "195 = " in warning and "196 = " in warning and str(tok.path) in warning
        assert prepare.literal_id_warning(tok, "vicuna") is None
    (tmp_path / "c.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"},
                                                                     {"from": "gpt", "value": "Hello"}]}) + "\n")
    args = ["--input", tmp_path / "c.jsonl", "--format", "sharegpt", "--tokenizer", tokenizers["baichuan"],
            "--template", "baichuan2", "--val_fraction", "0"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        run(*args, "--out", tmp_path / "o")
        sample.resolve_template("baichuan2", prepare.load_tokenizer(tokenizers["baichuan"]), "baichuan2")
    lines = [line for line in err.getvalue().splitlines() if "warning: --template=baichuan2" in line]
    assert [line.split(":")[0] for line in lines] == ["prepare.py", "sample.py"]


@pytest.fixture(scope="module")
def native_checkpoints(tokenizers, tmp_path_factory):
    import convert
    root, out = tmp_path_factory.mktemp("builtin"), {}
    dirs = {**tokenizers, **{n: root / f"{n}-tok" for n in ("sp-reserved", "baichuan-reserved",
                                                             "baichuan-user-defined")}}
    _reserved_sentencepiece(dirs["sp-reserved"], dummy_prefix=True)
    _reserved_sentencepiece(dirs["baichuan-reserved"], dummy_prefix=False)
    _reserved_sentencepiece(dirs["baichuan-user-defined"], dummy_prefix=False, kind="user_defined")
    for name in EXPORTS:
        hf_model_dir(dirs[name], root / f"{name}-hf")
        convert.main(["hf-to-native", "--src", str(root / f"{name}-hf"), "--dst", str(root / name)])
        out[name] = root / name
    return out


def export_with_template(ckpt, template, dst):
    """native-to-hf of a checkpoint fine-tuned with a built-in template -> what it wrote to stderr."""
    import convert
    src = dst.parent / "ckpt"
    shutil.copytree(ckpt, src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        convert.main(["native-to-hf", "--src", str(src), "--dst", str(dst)])
    return prepare.load_tokenizer(src), err.getvalue()


@pytest.mark.parametrize("name", sorted(EXPORTS))
@pytest.mark.parametrize("template", sorted(prepare.TEMPLATES))
def test_native_to_hf_writes_builtin_templates_as_jinja_with_encode_chats_ids(native_checkpoints, name, template,
                                                                              tmp_path):
    ours, err = export_with_template(native_checkpoints[name], template, tmp_path / "hf")
    theirs = hf_tokenizer(tmp_path / "hf")
    if template not in EXPORTS[name]:
        assert theirs.chat_template is None
        [line] = [l for l in err.splitlines() if "warning" in l]
        assert f"chat template '{template}' has no exact Jinja form" in line
        return
    assert "warning" not in err
    no_system = CONV[1:]  # the template's default system prompt, where it has one
    for messages, gen in ((CONV, False), (CONV, True), (CONV[:4], True), (CONV[:4], False), (no_system, True)):
        want = prepare.encode_chat(ours, template, messages, add_generation_prompt=gen)[0]
        got = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
        assert got == want, (messages, gen, theirs.convert_ids_to_tokens(got), theirs.convert_ids_to_tokens(want))
    assert "Paris." in theirs.decode(want)
