"""The application on top of the library: the `fastcaps` command's training, evaluation and Table 1 recipes."""
