"""Training: everything that runs under PyTorch Lightning. One job per module:

optimizer   weight-decay rule and LR schedule          rng          capture / restore every RNG
fingerprint content hash of the base weights            states       training-state files: safe I/O, listing, resume
module      the LightningModule (steps, loss scaling)   callbacks    training-state and metrics callbacks
health      NaN/Inf guard                               plot         the loss curve
strategy    Lightning strategy, fp32 export of trained  deepspeed    DeepSpeed made safe for adapter checkpoints
fit         builds the Trainer and runs it
"""
