#!/usr/bin/env bash
# Downloads CIFAR-10 or CIFAR-100 (binary version) from the authors' site, checks the archive's
# MD5 and the unpacked files' sizes, and unpacks into DEST (default: data/), giving
#   DEST/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin   (configs: data.root)
#   DEST/cifar-100-binary/{train,test}.bin
#
# usage: scripts/fetch_cifar.sh cifar10|cifar100 [DEST]
set -euo pipefail

which=${1:-}
dest=${2:-data}
case "$which" in
  cifar10)
    archive=cifar-10-binary.tar.gz
    md5=c32a1d4ab5d03f1284b67883e8d87530
    folder=cifar-10-batches-bin
    files="data_batch_1.bin:30730000 data_batch_2.bin:30730000 data_batch_3.bin:30730000 data_batch_4.bin:30730000 data_batch_5.bin:30730000 test_batch.bin:30730000"
    ;;
  cifar100)
    archive=cifar-100-binary.tar.gz
    md5=03b5dce01913d631647c71ecec9e9cb8
    folder=cifar-100-binary
    files="train.bin:153700000 test.bin:30740000"
    ;;
  *)
    echo "usage: $0 cifar10|cifar100 [DEST]" >&2
    exit 2
    ;;
esac
url="https://www.cs.toronto.edu/~kriz/$archive"

mkdir -p "$dest"
if [ ! -f "$dest/$archive" ]; then
  echo "downloading $url"
  if command -v curl >/dev/null; then
    curl -fL --retry 3 -o "$dest/$archive.part" "$url"
  else
    wget -O "$dest/$archive.part" "$url"
  fi
  mv "$dest/$archive.part" "$dest/$archive"
fi

got=$(md5sum "$dest/$archive" | cut -d' ' -f1)
if [ "$got" != "$md5" ]; then
  echo "error: $dest/$archive has MD5 $got, expected $md5; delete it and run again" >&2
  exit 1
fi
tar -xzf "$dest/$archive" -C "$dest"

for entry in $files; do
  name=${entry%%:*}
  size=${entry##*:}
  path="$dest/$folder/$name"
  actual=$(stat -c %s "$path" 2>/dev/null || echo missing)
  if [ "$actual" != "$size" ]; then
    echo "error: $path is $actual bytes, expected $size" >&2
    exit 1
  fi
done
echo "ok: $dest/$folder (set data.root = \"$dest/$folder\")"
