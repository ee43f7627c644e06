"""The networks: the papers' convnets (``models``), the heads and losses of each method on top of them
(``heads``), and the layers that make many ranks compute what one would (``layers``)."""
