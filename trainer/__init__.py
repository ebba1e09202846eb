"""helip trainer: DeepSpeed + open_clip training with online hard pairs and the hard negative margin loss."""
