"""Writing the media tree to an image and reading media back.

`split` cuts files too big for the target filesystem into parts; `iso` and `fat32` write the
tree as an ISO 9660 or FAT32 image; `source` reads a directory or an image without mounting it;
`fsinfo` tells how big a file a mounted target directory can hold.
"""
