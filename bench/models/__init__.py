"""Models: loading U-Nets (pretrained or random weights), the conditioning and decoding
pipelines around them, the LDM converter and the embedded digits model's data."""
