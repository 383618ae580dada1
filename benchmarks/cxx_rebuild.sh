#!/usr/bin/env bash
# The extension built again by another C++ compiler, for benchmarks/gpu_check.sh's C++
# runtime check (an error message with integers crashed the build of the first GPU runs'
# /opt/gcc/bin/g++): run in the repository root.
#
#   cxx_rebuild.sh ALT SAVE      build again with CXX=ALT, CC=ALT with g++ -> gcc
#   cxx_rebuild.sh --restore SAVE
#
# The first build (build/, cbn_ext/_C*.so) is set aside in SAVE, a folder of the
# repository that git ignores (a rename, which the check's exit trap does not remove), and
# put back where the second build fails or does not pass the check; --restore puts back one
# that a rebuild cut short (killed at its time limit) left there. Commands, run by bash -c:
# CBN_REBUILD_CMD (the build) and CBN_REBUILD_CHECK (the C++ runtime probe and whatever
# else the new build must pass). Exit: 0 the second build passes (ALT then remembered in
# build/.cbn_cxx, which gpu_check.sh's build reads on a rerun), 1 the first build is back,
# 2 nothing done (the first build could not be set aside).
set -u

restore() {  # SAVE: its contents back in place, the second build's removed
  local save=$1 f
  [ -d "$save" ] || return 0
  if [ -e "$save/build" ] || compgen -G "$save/_C*.so" > /dev/null; then
    rm -rf build cbn_ext/_C*.so
  fi
  [ -e "$save/build" ] && mv "$save/build" build
  for f in "$save"/_C*.so; do [ -e "$f" ] && mv "$f" cbn_ext/; done
  rm -rf "$save"
}

if [ "${1:-}" = --restore ]; then
  restore "$2"
  exit 0
fi
alt=$1 save=$2
altcc=${alt/g++/gcc}
restore "$save"  # one left by a run cut short
mkdir -p "$save" || exit 2
if [ -e build ] && ! mv build "$save/build"; then
  restore "$save"
  exit 2
fi
for so in cbn_ext/_C*.so; do
  if [ -e "$so" ] && ! mv "$so" "$save/"; then
    restore "$save"
    exit 2
  fi
done
echo "cxx_rebuild: the first build set aside in $save; building with CC=$altcc CXX=$alt"
if CC=$altcc CXX=$alt bash -c "$CBN_REBUILD_CMD" && bash -c "$CBN_REBUILD_CHECK"; then
  mkdir -p build
  echo "$altcc $alt" > build/.cbn_cxx
  rm -rf "$save"
  echo "cxx_rebuild: the second build passes; $alt remembered in build/.cbn_cxx"
  exit 0
fi
restore "$save"
echo "cxx_rebuild: the second build failed or did not pass the check: the first one is back"
exit 1
