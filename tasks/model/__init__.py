"""What a trained model is: how it is built (timm + keel's small nets), and its input views (Normalize,
test-time views). Shared by train, evaluate, serving and the discipline commands."""
