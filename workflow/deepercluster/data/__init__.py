"""Images in: the manifest stage (``data.manifest``) and the image library every stage reads through
(``data.images``)."""
