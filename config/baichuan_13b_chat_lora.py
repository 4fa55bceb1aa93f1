# LoRA on Baichuan-13B-Chat's attention projections (HF W_pack = our wq, wk, wv), cosine schedule, fp16, one device.
# Source: hiyouga/LLaMA-Efficient-Tuning README (2023-07-11 news: Baichuan-13B with --lora_target W_pack and
# --template baichuan for the Chat model; its SFT command: --finetuning_type lora --per_device_train_batch_size 4
# --gradient_accumulation_steps 4 --lr_scheduler_type cosine --learning_rate 5e-5 --num_train_epochs 3.0 --fp16 on
# --dataset alpaca_gpt4_en) with the tool's LoRA defaults of that time: rank 8, alpha 32, dropout 0.1; W_pack only,
# so o_proj (our wo) is not adapted. Cut-off 1024 tokens.
#   python convert.py hf-to-native --src=hf/Baichuan-13B-Chat --dst=checkpoints/baichuan-13b-chat
#   python prepare.py --input=alpaca_gpt4_data_en.json --format=alpaca --template=baichuan \
#       --tokenizer=checkpoints/baichuan-13b-chat --seq_len=1024 --pack --out=data/alpaca_gpt4_baichuan
#   python train.py config/baichuan_13b_chat_lora.py      # -> out/baichuan_13b_chat_lora/adapter and the merged export
#   python train.py config/baichuan_13b_chat_lora.py --dry_run
out_dir = "out/baichuan_13b_chat_lora"
data_dir = "data/alpaca_gpt4_baichuan"
init_from = "checkpoints/baichuan-13b-chat"
model = "baichuan-13b"
lora_rank = 8
lora_alpha = 32.0
lora_dropout = 0.1
lora_targets = "wq,wk,wv"  # W_pack
devices = 1
activation_checkpointing = "full"  # not in the source: without it the plan needs ~61 GiB of a 64 GB NPU, no headroom
dtype = "float16"
seq_len = 1024
micro_batch_size = 4
global_batch_size = 16
max_iters = 9750  # 3 epochs of 52K alpaca-gpt4 examples at 16 a step; packed rows hold several (see --dry_run)
lr = 5e-5
min_lr = 0.0
warmup_iters = 0
lr_decay_iters = 9750  # cosine
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
grad_clip = 1.0
eval_interval = 1000
eval_iters = 20
log_interval = 10
ckpt_interval = 1000
export = True
