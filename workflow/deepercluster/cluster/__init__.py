"""The clustering of a round: PCA-whitening (``pca``), k-means over a row source (``kmeans``, ``rows``), its two
levels as stages (``levels``) and the pseudo-labels made from them (``labels``)."""
