"""The offline shard writer: an ImageNet folder tree -> WebDataset tar shards (run by mokd-shards).

imagenet_folder lists a split and labels it; shard_writer writes one shard deterministically.
Needs only PIL: converting a dataset never imports torch.
"""
