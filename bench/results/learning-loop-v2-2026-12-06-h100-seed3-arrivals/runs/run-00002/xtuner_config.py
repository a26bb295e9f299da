# XTuner config written by oogiri (training/config.py) from
# training/templates/internvl_v2_internlm2_2b_qlora.py.tmpl.
#
# It keeps the semantics of the tutorial's QLoRA fine-tune of InternVL2-2B
# (XTuner's internvl_v2_internlm2_2b_qlora_finetune.py): 4-bit LLM with LoRA r/alpha on every
# LLM linear layer, frozen unquantised vision model, length-grouped sampling, AdamW under fp16
# AMP, linear warm-up then cosine decay, a checkpoint every save_steps iterations.
# oogiri replaces each double-brace placeholder with a Python literal. Rendered copies are
# regenerated on every run; to change more than settings allow, point
# settings.training.template at your own copy of this file.
from mmengine.hooks import (
    CheckpointHook,
    DistSamplerSeedHook,
    IterTimerHook,
    LoggerHook,
    ParamSchedulerHook,
)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from peft import LoraConfig
from torch.optim import AdamW
from transformers import AutoTokenizer

from xtuner.dataset import InternVL_V1_5_Dataset
from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.samplers import LengthGroupedSampler
from xtuner.engine.hooks import DatasetInfoHook
from xtuner.engine.runner import TrainLoop
from xtuner.model import InternVL_V1_5
from xtuner.utils import PROMPT_TEMPLATE

# ---------------------------------------------------------------- what oogiri decides
# Base model folder (InternVL2 remote-code layout; XTuner loads it with trust_remote_code).
path = '/tmp/oogiri-learning-loop/base'

# Data: every file is already mixed to its final size by `oogiri train export`, so each
# repeat_times entry is 1 (XTuner truncates fractional repeat_times above 1).
data_paths = ['/tmp/oogiri-learning-loop/data/training/runs/run-00002/data/train.json']
image_folders = ['/tmp/oogiri-learning-loop/data/training/runs/run-00002/data']
repeat_times = [1]
prompt_template = PROMPT_TEMPLATE.internlm2_chat
max_length = 6656

# Optimisation
batch_size = 4  # per device
accumulative_counts = 1
dataloader_num_workers = 2
max_epochs = 5
optim_type = AdamW
lr = 0.0005
betas = (0.9, 0.999)
weight_decay = 0.05
max_norm = 1.0  # gradient clipping
warmup_ratio = 0.34

# Checkpoints
save_steps = 1000
save_total_limit = 1  # -1 keeps every checkpoint

# LoRA on the (quantised) LLM
quantization_llm = True
lora_r = 128
lora_alpha = 256
lora_dropout = 0.05
seed = 3

# ---------------------------------------------------------------- model
model = dict(
    type=InternVL_V1_5,
    model_path=path,
    freeze_llm=True,
    freeze_visual_encoder=True,
    quantization_llm=quantization_llm,
    quantization_vit=False,
    llm_lora=dict(
        type=LoraConfig,
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=None,
        task_type='CAUSAL_LM',
    ),
)

# ---------------------------------------------------------------- data
llava_dataset = dict(
    type=InternVL_V1_5_Dataset,
    model_path=path,
    data_paths=data_paths,
    image_folders=image_folders,
    repeat_times=repeat_times,
    template=prompt_template,
    max_length=max_length,
)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=llava_dataset,
    sampler=dict(
        type=LengthGroupedSampler,
        length_property='modality_length',
        per_device_batch_size=batch_size * accumulative_counts,
    ),
    collate_fn=dict(type=default_collate_fn),
)

# ---------------------------------------------------------------- optimiser and schedule
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale='dynamic',
    dtype='float16',
)

# Warm-up and decay are given in epochs and converted to iterations by mmengine (truncated:
# oogiri checks before launching that the warm-up lasts at least two iterations: with one,
# LinearLR never leaves start_factor and the run trains at lr × 1e-5).
param_scheduler = [
    dict(
        type=LinearLR,
        start_factor=1e-5,
        by_epoch=True,
        begin=0,
        end=warmup_ratio * max_epochs,
        convert_to_iter_based=True,
    ),
    dict(
        type=CosineAnnealingLR,
        eta_min=0.0,
        by_epoch=True,
        begin=warmup_ratio * max_epochs,
        end=max_epochs,
        convert_to_iter_based=True,
    ),
]

train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

# ---------------------------------------------------------------- runtime
tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=path,
    trust_remote_code=True,
)

custom_hooks = [dict(type=DatasetInfoHook, tokenizer=tokenizer)]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    # oogiri parses these lines for its progress bar: "Iter(train) [ 10/120] ... loss: ..."
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=1),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(
        type=CheckpointHook,
        save_optimizer=False,
        by_epoch=False,
        interval=save_steps,
        max_keep_ckpts=save_total_limit,
    ),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)

visualizer = None
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=seed, deterministic=False)
log_processor = dict(by_epoch=False)
