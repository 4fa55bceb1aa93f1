# Supervised fine-tuning of the main job's model on instruction data: loss only on the assistant replies.
#   python prepare.py --input=chats.jsonl --format=sharegpt --tokenizer=out/default/export --template=vicuna \
#       --out=data/sft_tiny
#   python train.py config/sft_tiny.py
# The model comes from the checkpoint dir (its config.json); data must use that checkpoint's tokenizer.
out_dir = "out/sft_tiny"
data_dir = "data/sft_tiny"
init_from = "out/default/export"
seq_len = 64
micro_batch_size = 16
global_batch_size = 16
max_iters = 200
lr = 5e-4  # fine-tuning: a tenth of pretraining's
min_lr = 5e-5
warmup_iters = 10
lr_decay_iters = 200
weight_decay = 0.0
beta2 = 0.99
eval_interval = 50
eval_iters = 10
log_interval = 10
ckpt_interval = 100
keep_last = 2  # one damaged step dir falls back to the one before
export = True
