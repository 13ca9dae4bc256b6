"""Dataset recipes: code that makes a particular dataset (the demo corpus), standing on data/'s shard writing."""
