# Baichuan-7B QLoRA supervised fine-tuning on one accelerator: NF4 base with double quantisation, bf16 compute, LoRA
# rank 8 / alpha 16 / dropout 0.05 on every linear layer but the output head, the "Human: ...\n\nAssistant: ..."
# prompt, the loss on every token.
# Document: seed 003, section 1.1.3 "baichuan-7B的微调" (wp931120/baichuan_sft_lora, its sft_lora.py as listed: lines
# 40-185; lines 1-39 are illegible in the document).
#
# | value              | document says                          | we use                        | why different
# | base, quantisation | BitsAndBytes nf4, double quant, compute| qlora (NF4, double quant),    |
# |                    | bfloat16; prepare_model_for_kbit_train.| bfloat16, full checkpointing  |
# | LoRA               | r 8, alpha 16, dropout 0.05, every     | the same (wq wk wv wo w1 w2   |
# |                    | Linear4bit but lm_head                 | w3: W_pack's q/k/v separate)  |
# | data               | BelleGroup train_0.5M_CN               | the same (prep below)         |
# | prompt             | bos + "Human: " + instruction + input +| human-assistant template:     |
# |                    | "\n\nAssistant: " + output + eos       | the same text                 |
# | loss               | labels = input_ids (every token)       | --train_on_prompt             |
# | batch              | per device 1, accumulation 4           | micro 1, global 4             |
# | padding            | DataCollatorForSeq2Seq, one example a  | --one_per_row: one example a  | padded to 1024, not
# |                    | row                                    | row (padding not counted)     | to a multiple of 8
# | epochs, lr         | 1 epoch, 3e-4                          | the same                      |
# | optimiser          | optim adamw_torch (HF Trainer: 0.9/    | the same; linear decay        |
# |                    | 0.999, eps 1e-8, wd 0, clip 1.0,       |                               |
# |                    | linear decay, no warmup)               |                               |
# | cut-off            | CUTOFF_LEN (its value is illegible)    | 1024                          | our choice
# | validation         | VAL_SET_SIZE (illegible)               | prepare.py's 2%               | our choice
# | memory             | about 7 GB (显存占用为7G左右)          | dry run below                 |
#
# Our --dry_run (40% MFU of 313 TFLOP/s, one 64 GB device): 5.7 GiB, 0.94 s/step, 4,365 tokens/s; a padded row
# counts as 1024 tokens there. Measured on this repository's 2-core CPU (README "LoRA and QLoRA"): 5.46 GiB peak
# RSS for one step at seq 512.
#
#   python convert.py hf-to-native --src=hf/baichuan-7B --dst=checkpoints/baichuan-7b
#   python prepare.py --input=Belle_open_source_0.5M.json --format=belle --template=human-assistant \
#       --train_on_prompt --tokenizer=checkpoints/baichuan-7b --seq_len=1024 --pack --one_per_row \
#       --out=data/belle_baichuan
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
max_iters = 122_500  # 1 epoch: about 490K training examples at 4 a step (prepare.py prints the count)
lr = 3e-4
min_lr = 0.0
warmup_iters = 0
lr_decay = "linear"
lr_decay_iters = 122_500
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
adam_eps = 1e-8
grad_clip = 1.0
eval_interval = 2000
eval_iters = 20
log_interval = 10
ckpt_interval = 2000  # save_steps
export = True
