"""finetune-operator: reconciles FineTuneJobs into gangs of trainer pods."""
