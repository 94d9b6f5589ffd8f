"""Xception on ImageNet (Chollet 2017).

Arguments: `--config=configs/xception.py:res=299`.
"""

from configs import default


def get_config(arg=None):
  args = default.parse_arg(arg, res=299)
  config = default.get_config()
  default.set_model(config, 'xception', 1.0)
  config.model.dropout_rate = 0.5  # section 4.3: dropout 0.5 before the logistic regression
  # Keras applications' Xception (by the paper's author): BatchNorm epsilon 1e-3, inputs in [-1, 1].
  config.model.bn_epsilon = 1e-3
  config.image_size = args.res

  # Section 4.3 (ImageNet): SGD with momentum 0.9, lr 0.045 decayed by 0.94 every 2 epochs, L2
  # weight decay 1e-5 on every kernel, Polyak averaging of the weights at inference. The paper
  # gives neither the batch size (60 K80 GPUs, synchronous) nor the number of epochs: 100 epochs
  # at a global batch of 1536, lr 0.045 at that batch, are this config's choice.
  config.batch_size = 1536
  config.eval_batch_size = 1000
  config.num_epochs = 100.0
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.learning_rate = 0.045
  config.lr_reference_batch_size = 1536
  config.schedule = 'exponential'
  config.lr_decay_rate = 0.94
  config.lr_decay_epochs = 2.0
  config.lr_staircase = True
  config.weight_decay = 1e-5
  config.weight_decay_type = 'l2'
  config.weight_decay_exclude = r'.*/bias|.*/scale'
  config.ema_decay = 0.9999
  return config
