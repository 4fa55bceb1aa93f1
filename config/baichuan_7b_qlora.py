# Baichuan-7B QLoRA supervised fine-tuning on one accelerator: NF4 base (double quantisation), bf16 compute, LoRA
# rank 8, alpha 16, dropout 0.05 on every linear layer but the output head; "Human: ...\n\nAssistant: ..." template.
# Source: wp931120/baichuan_sft_lora sft_lora.py (BitsAndBytesConfig nf4 + double quant + bf16 compute;
# LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05) on all Linear4bit but lm_head; prepare_model_for_kbit_training,
# which turns on gradient checkpointing; CUTOFF_LEN 1024; 1 epoch of Belle_open_source_0.5M.json minus 2,000 for
# validation; batch 1 x 4 accumulation; lr 3e-4; Trainer defaults: AdamW 0.9/0.999, no weight decay, linear decay,
# no warmup) and its README ("about 12 GB of GPU memory"). The source's loss counts every token (labels = input_ids,
# prompt included): prepare.py --train_on_prompt does the same.
#   python convert.py hf-to-native --src=hf/baichuan-7B --dst=checkpoints/baichuan-7b
#   python prepare.py --input=Belle_open_source_0.5M.json --format=belle --template=human-assistant \
#       --train_on_prompt --tokenizer=checkpoints/baichuan-7b --seq_len=1024 --pack --out=data/belle_baichuan
#   python train.py config/baichuan_7b_qlora.py       # -> out/baichuan_7b_qlora/adapter and the merged export
#   python train.py config/baichuan_7b_qlora.py --dry_run
out_dir = "out/baichuan_7b_qlora"
data_dir = "data/belle_baichuan"
init_from = "checkpoints/baichuan-7b"
model = "baichuan-7b"
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = "wq,wk,wv,wo,w1,w2,w3"  # every linear layer but the output head
qlora = True
devices = 1
activation_checkpointing = "full"
dtype = "bfloat16"
seq_len = 1024
micro_batch_size = 1
global_batch_size = 4
max_iters = 124_500  # 1 epoch of 498K examples at 4 a step; packed rows hold several (see --dry_run)
lr = 3e-4
min_lr = 0.0
warmup_iters = 0
lr_decay_iters = 124_500  # the source decays linearly to 0; ours is cosine to 0
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
grad_clip = 1.0
eval_interval = 2000
eval_iters = 20
log_interval = 10
ckpt_interval = 2000
export = True
