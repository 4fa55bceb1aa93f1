# Baichuan-13B-Chat LoRA on its fused W_pack over a 4-bit base, fp16, one device, alpaca_gpt4_zh for one epoch.
# Document: seed 003, section 1.2.2 "基于LoRA 微调Baichuan-13B-Chat过程(单轮)" (LLaMA-Efficient-Tuning
# src/train_bash.py). In "document says", plain text is the document's (its step in brackets: 4. the arguments, the
# log below them); "LLaMA-Efficient-Tuning:" that tool's defaults of July 2023 (hparams: lora_alpha 32, lora_dropout
# 0.1, nf4 with double quantisation; gradient checkpointing on; the source tokens get no loss; dsets/preprocess.py
# cuts each turn's prompt to its first 256 tokens and its reply to 511 plus eos, and drops a turn past 768; no
# split unless --dev_ratio); "HF Trainer:" the Hugging Face Trainer's (AdamW 0.9/0.999, eps 1e-8, no weight decay,
# no warmup, clip 1.0, fp16 GradScaler 2^16 doubled every 2000 good steps); "ours:" our reading.
#
# | value              | document says                          | we use                        | why different
# | base               | Baichuan-13B-Chat, --quantization_bit 4| qlora (NF4, double quant)     |
# |                    | [4]                                    |                               |
# | LoRA               | --lora_target W_pack, --lora_rank 8    | lora_targets W_pack, rank 8,  |
# |                    | [4]; LLaMA-Efficient-Tuning: alpha 32, | alpha 32, dropout 0.1         |
# |                    | dropout 0.1                            |                               |
# | template, data     | --template baichuan, alpaca_gpt4_zh [3,| the same (prep below)         |
# |                    | 4]                                     |                               |
# | lengths            | --max_source_length 256,               | --max_source_len=256,         |
# |                    | --max_target_length 512 [4]            | --max_target_len=512 (its     |
# |                    |                                        | per-turn cut), rows of 768    |
# |                    |                                        | tokens, one example each      |
# | batch              | per device 1, accumulation 1 [4]       | micro 1, global 1             |
# | lr                 | 5e-5, --lr_scheduler_type cosine [4]   | the same                      |
# | epochs, steps      | 1.0 [4]; 48818 steps (the bar:         | 48,770 = one epoch of the     | ours: train.py needs a
# |                    | 1000/48818) [log]                      | 48,818 less 48 held out       | val split: 0.1%
# | precision          | --fp16 [4]                             | float16 (dynamic loss scale,  |
# |                    |                                        | HF Trainer: 2^16, window 2000)|
# | padding            | --padding_side right [4]               | padding after the example     |
# | save, log          | --save_steps 10000, --logging_steps 10 | the same                      |
# |                    | [4]                                    |                               |
# | memory, time       | 显存占用约9个G，运行时间大概60小时 [4] | dry run below                 |
# | loss weighting     | HF Trainer: each micro batch's mean    | token (the default): one      |
# |                    | over its counted targets, then the     | example a step, so the two    |
# |                    | mean over micro batches and devices    | are the same                  |
#
# Document's figures [log]: the bar "1000/48818 [1:24:26<57:28:20, 4.33s/it]" (1,000 steps in 5,066 s, 5.07 s/step on
# average; 4.33 s/it then, 57.5 h left at that rate) with a log dict beside it, {'loss': 1.9935, 'learning_rate':
# 4.9999995806904065e-05, 'epoch': 0.0}. That learning rate is the 5e-5 cosine over 48818 steps at step 9 exactly
# (at step 1000 it is 4.9948e-05): the dict is the first logging_steps=10 entry, so 1.9935 is the mean loss of about
# the first 10 steps, not the loss at step 1000; the log shows no loss at step 1000. After 1 epoch: train_loss 1.2808
# (the Trainer's mean over every step), train_runtime 161,449.7 s (44:50:49, 0.302 samples/s = 3.31 s/step); the last
# logged losses 1.19-1.38. Our --dry_run (one 64 GB device, 40% MFU of 313 TFLOP/s): 8.9 GiB, 0.33 s/step, 2,333
# tokens/s; a padded row counts as 768 tokens there.
#
#   python convert.py hf-to-native --src=hf/Baichuan-13B-Chat --dst=checkpoints/baichuan-13b-chat
#   python prepare.py --input=alpaca_gpt4_data_zh.json --format=alpaca --template=baichuan \
#       --tokenizer=checkpoints/baichuan-13b-chat --max_source_len=256 --max_target_len=512 --seq_len=768 --pack \
#       --one_per_row --val_fraction=0.001 --out=data/alpaca_gpt4_zh_baichuan
#   python train.py config/baichuan_13b_chat_lora.py      # -> out/baichuan_13b_chat_lora/adapter and the merged export
#   python train.py config/baichuan_13b_chat_lora.py --dry_run
out_dir = "out/baichuan_13b_chat_lora"
data_dir = "data/alpaca_gpt4_zh_baichuan"
init_from = "checkpoints/baichuan-13b-chat"
model = "baichuan-13b"
lora_rank = 8
lora_alpha = 32.0
lora_dropout = 0.1
lora_targets = "W_pack"
qlora = True
devices = 1
activation_checkpointing = "full"
dtype = "float16"
loss_scale = 65536.0  # the HF Trainer's fp16 GradScaler: 2^16, doubled after 2000 good steps
loss_scale_window = 2000
seq_len = 768
micro_batch_size = 1
global_batch_size = 1
loss_weighting = "token"  # one example a step: the Trainer's mean too
max_iters = 48_770  # one epoch: 48,818 examples (the document's bar) less floor(0.1%) = 48 held out
lr = 5e-5
min_lr = 0.0
warmup_iters = 0
lr_decay_iters = 48_770  # cosine
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
adam_eps = 1e-8
grad_clip = 1.0
eval_interval = 10000
eval_iters = 20
log_interval = 10  # logging_steps
ckpt_interval = 10000  # save_steps
keep_last = 2  # our choice (the source sets no limit): a damaged newest step dir falls back to the one before
export = True
