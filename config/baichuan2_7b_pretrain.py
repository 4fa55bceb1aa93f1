# Baichuan2-7B continued pretraining on 8 Ascend NPUs (AscendSpeed), bf16, tensor parallel 8, NormHead.
# Document: seed 001, AscendSpeed "BaiChuan2" README, section Baichuan2-7B (Training, Script 3-6, Performance). It
# names examples/baichuan2/pretrain_baichuan2_ptd_7B.sh. In "document says", plain text is the document's (its
# subsection in brackets); "script:" marks that script's values in Ascend/AscendSpeed at master 64b1937 (2023-12-14);
# "AscendSpeed:" what its ascendspeed/arguments.py defaults to at that commit; "ours:" our reading.
#
# | value              | document says                          | we use                        | why different
# | devices            | 8 x Ascend NPUs [Training]             | devices=8                     |
# | mesh               | --tensor-model-parallel-size 8,        | dp=1, tp=8 (sequence parallel)|
# |                    | --pipeline-model-parallel-size 1       |                               |
# |                    | [Script 3]                             |                               |
# | weights            | Baichuan2-7B-Base, --load ./weight     | init_from checkpoints/...     | ours is a checkpoint
# |                    | [Script 3, 5]                          | (convert.py hf-to-native, or  | dir
# |                    |                                        | ascendspeed-to-native of      |
# |                    |                                        | ./weight)                     |
# | data               | tatsu-lab/alpaca train parquet,        | the same (prep below)         |
# |                    | preprocess_data.py [Script 4]          |                               |
# | end of record      | no --append-eod [Script 4]             | eos after each record         | prepare.py's data:
# |                    |                                        |                               | documents end with
# |                    |                                        |                               | eos (one token a
# |                    |                                        |                               | record)
# | split              | script: --split 949,50,1 (documents)   | --val_fraction=0.05; the 0.1% | Megatron's is by
# |                    |                                        | test part stays in train      | position
# | iterations         | total Iterations 1024 [Performance]    | max_iters=1024                |
# | lr schedule        | script: --lr 1e-6 cosine to --min-lr   | the same: decay over 100000,  | the table's run is
# |                    | 1e-8 over --train-iters 100000, no     | 1024 steps of it run          | the first 1024 of it
# |                    | warmup                                 |                               |
# | global batch       | script: 128; ours: 5.125 samples/s x   | 128                           |
# |                    | 24.97 s/step = 128 [Performance]       |                               |
# | sequence           | script: --seq-length 4096; ours: 2607  | 4096                          |
# |                    | tok/s/p x 8 x 24.97 s / 128 ~ 4068     |                               |
# | micro batch        | script: 4                              | 4                             |
# | precision          | script: --bf16                         | bfloat16                      |
# | optimiser          | script: Adam 0.9/0.95, --weight-decay  | the same                      |
# |                    | 1e-2, --clip-grad 1.0; AscendSpeed:    |                               |
# |                    | --adam-eps 1e-8                        |                               |
# | NormHead, z-loss   | script: --lm-norm-weight, no z-loss    | norm_head (preset), z_loss 0  |
# | recompute          | script: none                           | none                          |
# | eval, save, log    | script: eval every 1000 (10 iters),    | the same                      |
# |                    | save every 1000, log 1                 |                               |
# | loss weighting     | AscendSpeed: each micro batch's mean   | token (the default): every    |
# |                    | over its counted targets, then the     | target counts, so all micro   |
# |                    | mean over micro batches and devices    | batches count alike and the   |
# |                    |                                        | two are the same              |
#
# Document's figures (8 NPUs) [Performance]: 2,607 tokens/s per device, 24.97 s/step, 124 TFLOP/s, 5.125 samples/s
# (reference: 3,969 tokens/s per device); the loss [Accuracy of the loss]: only plots (NPU vs reference loss, relative
# error), no stated criterion in this section (the 0.02 is the Baichuan2-13B section's). Our --dry_run, 40% MFU of
# 313 TFLOP/s: 27.1 GiB per device of 64, 25.3 s/step, 2,587 tokens/s per device.
# Compare a run's loss with a reference run (the threshold is ours, taken from the 13B section):
#   python bench.py --plot reference/metrics.jsonl out/baichuan2_7b_pretrain/metrics.jsonl --max_rel_err=0.02
#
# Data: the parquet's "text" column (Megatron preprocess_data.py's default --json-keys text, hence
# alpaca_text_document), every token counted; or the Megatron files the document's command wrote (prepare.py then
# ends each record with eos too):
#   python convert.py hf-to-native --src=hf/Baichuan2-7B-Base --dst=checkpoints/baichuan2-7b-base
#   python prepare.py --input=train-00000-of-00001-a09b74b3ef9c3b56.parquet --format=parquet --text_field=text \
#       --tokenizer=checkpoints/baichuan2-7b-base --val_fraction=0.05 --megatron --out=data/alpaca_baichuan2
#   python prepare.py --input=dataset_baichuan2-7B/alpaca_text_document.bin --format=megatron \
#       --tokenizer=checkpoints/baichuan2-7b-base --val_fraction=0.05 --out=data/alpaca_baichuan2  # or: Megatron's
#   torchrun --nproc_per_node=8 train.py config/baichuan2_7b_pretrain.py
#   python train.py config/baichuan2_7b_pretrain.py --dry_run
# The document's ./weight (TP 8, --merge-mlp --pse) and a run's --save dir come in and go back:
#   python convert.py ascendspeed-to-native --src=weight-tp8 --like=checkpoints/baichuan2-7b-base \
#       --dst=checkpoints/baichuan2-7b-ascend
#   python convert.py native-to-ascendspeed --src=out/baichuan2_7b_pretrain/export --dst=weight --tp=8
out_dir = "out/baichuan2_7b_pretrain"
data_dir = "data/alpaca_baichuan2"
init_from = "checkpoints/baichuan2-7b-base"  # raw NormHead rows (norm_head=true): normalised in every forward
model = "baichuan2-7b"
devices = 8
dp, tp = 1, 8
activation_checkpointing = "none"
dtype = "bfloat16"
seq_len = 4096
micro_batch_size = 4
global_batch_size = 128
loss_weighting = "token"  # every target counts: the script's per-micro-batch mean too
max_iters = 1024
lr = 1e-6
min_lr = 1e-8
warmup_iters = 0
lr_decay_iters = 100_000  # the script's --train-iters: the table's 1024 steps are the start of it
weight_decay = 0.01
beta1, beta2 = 0.9, 0.95
adam_eps = 1e-8
grad_clip = 1.0
eval_interval = 1000
eval_iters = 10
log_interval = 1
ckpt_interval = 1000
keep_last = 2  # our choice (the source sets no limit): a damaged newest step dir falls back to the one before
export = True
