"""MobileNet V1 on ImageNet (Howard et al. 2017).

Arguments: `--config=configs/mobilenet_v1.py:alpha=0.5,res=160`.
"""

from configs import default


def get_config(arg=None):
  args = default.parse_arg(arg, alpha=1.0, res=224)
  config = default.get_config()
  config.model.name = 'mobilenet_v1'
  config.model.alpha = args.alpha
  # TF-slim's MobileNet V1: dropout keep probability 0.999, BatchNorm decay 0.9997, epsilon 1e-3.
  config.model.dropout_rate = 0.001
  config.model.bn_momentum = 0.9997
  config.model.bn_epsilon = 1e-3
  config.image_size = args.res

  # Section 3.2: RMSProp, little weight decay and none on the depthwise kernels; the TF release
  # decayed lr 0.045 by 0.94 every 2.5 epochs. Global batch 96 x 16 as for MobileNet V2.
  config.batch_size = 1536
  config.eval_batch_size = 1000
  config.num_epochs = 300.0
  config.optimizer = 'rmsprop'
  config.learning_rate = 0.045
  config.lr_reference_batch_size = 1536
  config.schedule = 'exponential'
  config.lr_decay_rate = 0.94
  config.lr_decay_epochs = 2.5
  config.lr_staircase = True
  config.weight_decay = 4e-5
  config.weight_decay_type = 'l2'
  config.label_smoothing = 0.0
  return config
