// Tests of the data pipeline: Megatron-LM indexed dataset reader/writer (round trips, a file built
// byte by byte from the documented layout, every corruption case), byte tokenizer, window sampler
// (determinism, epochs, DP slices, resume, overlap) and the vocabulary check.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/tensor.hpp"
#include "data/indexed_dataset.hpp"
#include "data/sampler.hpp"
#include "data/tokenizer.hpp"

namespace fs = std::filesystem;
using namespace dsv3;

namespace {

// A fresh directory under /tmp, removed with the fixture.
class DataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/dsv3_data_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  std::string dir_;
};

// Little-endian bytes built explicitly, independent of the writer's code.
struct Bytes {
  std::vector<uint8_t> b;
  Bytes& raw(const char* s, size_t n) {
    for (size_t i = 0; i < n; ++i) b.push_back(static_cast<uint8_t>(s[i]));
    return *this;
  }
  Bytes& le(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) b.push_back(static_cast<uint8_t>((v >> (8 * i)) & 0xff));
    return *this;
  }
  Bytes& u8(uint8_t v) { return le(v, 1); }
  Bytes& u16(uint16_t v) { return le(v, 2); }
  Bytes& i32(int32_t v) { return le(static_cast<uint32_t>(v), 4); }
  Bytes& u64(uint64_t v) { return le(v, 8); }
  Bytes& i64(int64_t v) { return le(static_cast<uint64_t>(v), 8); }
};

void write_file(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// The index of the documented layout: magic, version, dtype, S, D, lengths, pointers, doc indices.
Bytes megatron_index(uint8_t dtype_code, const std::vector<int32_t>& lengths,
                     const std::vector<int64_t>& pointers, const std::vector<int64_t>& doc_idx) {
  Bytes idx;
  idx.raw("MMIDIDX\0\0", 9).u64(1).u8(dtype_code).u64(lengths.size()).u64(doc_idx.size());
  for (int32_t l : lengths) idx.i32(l);
  for (int64_t p : pointers) idx.i64(p);
  for (int64_t d : doc_idx) idx.i64(d);
  return idx;
}

// Expects fn to throw dsv3::Error whose message contains every one of `parts`.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "expected dsv3::Error containing '" << parts.front() << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts)
      EXPECT_NE(msg.find(p), std::string::npos) << "message: " << msg << "\nmissing: " << p;
  }
}

std::vector<int32_t> iota_vec(int32_t from, int32_t n) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), from);
  return v;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Indexed dataset

TEST_F(DataTest, RoundTripEveryDtype) {
  const std::vector<TokenDType> dtypes = {TokenDType::UInt8,   TokenDType::Int8,   TokenDType::Int16,
                                          TokenDType::UInt16,  TokenDType::Int32,  TokenDType::Int64,
                                          TokenDType::Float32, TokenDType::Float64};
  for (TokenDType t : dtypes) {
    SCOPED_TRACE(token_dtype_name(t));
    const bool wide = token_dtype_size(t) >= 2 && t != TokenDType::Int16;
    const bool is_signed = t != TokenDType::UInt8 && t != TokenDType::UInt16;
    const std::vector<std::vector<int32_t>> docs = {
        {1, 2, 3, 120},
        {},
        {0},
        {wide ? 60000 : 100, is_signed ? -5 : 5, 7, 9, 11},
    };
    const std::string prefix = path(std::string("rt_") + token_dtype_name(t));
    {
      IndexedDatasetWriter w(prefix, t);
      for (const auto& d : docs) w.add_document(d);
      EXPECT_FALSE(fs::exists(prefix + ".bin"));  // nothing under the real names before finalize
      w.finalize();
      EXPECT_EQ(w.num_documents(), 4);
      EXPECT_EQ(w.num_tokens(), 10);
    }
    EXPECT_FALSE(fs::exists(prefix + ".bin.tmp"));
    EXPECT_FALSE(fs::exists(prefix + ".idx.tmp"));
    EXPECT_EQ(fs::file_size(prefix + ".bin"), 10 * token_dtype_size(t));
    EXPECT_EQ(fs::file_size(prefix + ".idx"), 34u + 12u * 4 + 8u * 5);

    auto ds = IndexedDataset::open(prefix);
    EXPECT_EQ(ds->dtype(), t);
    EXPECT_EQ(ds->num_sequences(), 4);
    EXPECT_EQ(ds->num_documents(), 4);
    EXPECT_EQ(ds->num_tokens(), 10);
    std::vector<int32_t> all;
    for (size_t i = 0; i < docs.size(); ++i) {
      EXPECT_EQ(ds->sequence(static_cast<int64_t>(i)), docs[i]);
      EXPECT_EQ(ds->document_sequences(static_cast<int64_t>(i)),
                std::make_pair(static_cast<int64_t>(i), static_cast<int64_t>(i + 1)));
      all.insert(all.end(), docs[i].begin(), docs[i].end());
    }
    // Arbitrary ranges of the concatenation, across sequence boundaries.
    for (int64_t s = 0; s < 10; ++s)
      for (int64_t n = 0; s + n <= 10; ++n) {
        std::vector<int32_t> got(static_cast<size_t>(n));
        ds->read_tokens(s, n, got.data());
        EXPECT_EQ(got, std::vector<int32_t>(all.begin() + s, all.begin() + s + n));
      }
    EXPECT_EQ(ds->max_token_id(), *std::max_element(all.begin(), all.end()));
    EXPECT_EQ(ds->min_token_id(), *std::min_element(all.begin(), all.end()));
    EXPECT_EQ(ds->locate(4), std::make_pair(int64_t{2}, int64_t{0}));  // empty sequence 1 is skipped
    EXPECT_THROW(ds->read_tokens(8, 3, all.data()), Error);
  }
}

TEST_F(DataTest, MultiSequenceDocumentsAndOverwrite) {
  const std::string prefix = path("multi");
  for (int round = 0; round < 2; ++round) {  // the second round replaces the first dataset
    IndexedDatasetWriter w(prefix, TokenDType::UInt16);
    w.add_sequence(iota_vec(10 * round, 3).data(), 3);
    w.add_sequence(iota_vec(100, 2).data(), 2);
    w.end_document();
    w.add_document({7, 8});
    w.add_sequence(iota_vec(1, 1).data(), 1);  // closed into a document by finalize
    w.finalize();
    EXPECT_THROW(w.finalize(), Error);
    EXPECT_THROW(w.add_document({1}), Error);
  }
  auto ds = IndexedDataset::open(prefix);
  EXPECT_EQ(ds->num_sequences(), 4);
  EXPECT_EQ(ds->num_documents(), 3);
  EXPECT_EQ(ds->document_sequences(0), std::make_pair(int64_t{0}, int64_t{2}));
  EXPECT_EQ(ds->document_sequences(1), std::make_pair(int64_t{2}, int64_t{3}));
  EXPECT_EQ(ds->document_sequences(2), std::make_pair(int64_t{3}, int64_t{4}));
  EXPECT_EQ(ds->sequence(0), (std::vector<int32_t>{10, 11, 12}));
  EXPECT_EQ(ds->sequence_start(3), 7);
}

TEST_F(DataTest, WriterRejectsIdsTheDtypeCannotHoldAndCleansUp) {
  const std::string prefix = path("bad");
  {
    IndexedDatasetWriter w(prefix, TokenDType::UInt8);
    w.add_document({1, 2});
    expect_error([&] { w.add_document({1, 300}); }, {"300", "uint8"});
    EXPECT_TRUE(fs::exists(prefix + ".bin.tmp"));
  }  // abandoned: no finalize
  EXPECT_FALSE(fs::exists(prefix + ".bin.tmp"));
  EXPECT_FALSE(fs::exists(prefix + ".bin"));
  EXPECT_FALSE(fs::exists(prefix + ".idx"));
  IndexedDatasetWriter f(path("f32"), TokenDType::Float32);
  EXPECT_THROW(f.add_document({(1 << 24) + 1}), Error);  // not exact in float32
  expect_error([&] { IndexedDatasetWriter w(path("no/such/dir/x"), TokenDType::UInt16); },
               {path("no/such/dir/x.bin.tmp"), "cannot create"});
}

// The layout exactly as Megatron-LM writes it, constructed byte by byte: two documents, the first of
// two sequences, uint16 tokens.
TEST_F(DataTest, ReadsHandBuiltMegatronLayout) {
  const std::string prefix = path("hand");
  Bytes bin;
  for (uint16_t v : {10, 11, 12, 13, 60000, 15}) bin.u16(v);
  write_file(prefix + ".bin", bin.b);
  write_file(prefix + ".idx", megatron_index(8, {3, 1, 2}, {0, 6, 8}, {0, 2, 3}).b);

  auto ds = IndexedDataset::open(prefix);
  EXPECT_EQ(ds->dtype(), TokenDType::UInt16);
  EXPECT_EQ(ds->num_sequences(), 3);
  EXPECT_EQ(ds->num_documents(), 2);
  EXPECT_EQ(ds->num_tokens(), 6);
  EXPECT_EQ(ds->sequence(0), (std::vector<int32_t>{10, 11, 12}));
  EXPECT_EQ(ds->sequence(1), (std::vector<int32_t>{13}));
  EXPECT_EQ(ds->sequence(2), (std::vector<int32_t>{60000, 15}));
  EXPECT_EQ(ds->sequence_pointer(2), 8);
  EXPECT_EQ(ds->document_sequences(0), std::make_pair(int64_t{0}, int64_t{2}));
  EXPECT_EQ(ds->max_token_id(), 60000);

  // Our writer produces the identical bytes for the same content.
  IndexedDatasetWriter w(path("ours"), TokenDType::UInt16);
  w.add_sequence(iota_vec(10, 3).data(), 3);
  w.add_sequence(iota_vec(13, 1).data(), 1);
  w.end_document();
  w.add_document({60000, 15});
  w.finalize();
  EXPECT_EQ(read_file(path("ours.bin")), bin.b);
  EXPECT_EQ(read_file(path("ours.idx")), read_file(prefix + ".idx"));
}

TEST_F(DataTest, ReadsGappedPointersAndMultimodalModes) {
  // int32 tokens with 8 unused bytes between the sequences; the S trailing mode bytes of a multimodal
  // index are accepted and ignored.
  const std::string prefix = path("gap");
  Bytes bin;
  bin.i32(1).i32(2).i32(-1).i32(-1).i32(3).i32(4).i32(5);
  write_file(prefix + ".bin", bin.b);
  Bytes idx = megatron_index(4, {2, 3}, {0, 16}, {0, 1, 2});
  idx.u8(0).u8(0);
  write_file(prefix + ".idx", idx.b);
  auto ds = IndexedDataset::open(prefix);
  EXPECT_EQ(ds->num_tokens(), 5);
  std::vector<int32_t> got(4);
  ds->read_tokens(1, 4, got.data());
  EXPECT_EQ(got, (std::vector<int32_t>{2, 3, 4, 5}));
  EXPECT_EQ(ds->locate(2), std::make_pair(int64_t{1}, int64_t{0}));
  EXPECT_EQ(ds->max_token_id(), 5);
}

TEST_F(DataTest, NonIntegralStoredValuesAreReported) {
  const std::string prefix = path("float");
  Bytes bin;
  uint32_t bits;
  const float vals[] = {1.0f, 2.5f};
  for (float v : vals) {
    std::memcpy(&bits, &v, 4);
    bin.le(bits, 4);
  }
  write_file(prefix + ".bin", bin.b);
  write_file(prefix + ".idx", megatron_index(7, {2}, {0}, {0, 1}).b);
  auto ds = IndexedDataset::open(prefix);
  expect_error([&] { ds->sequence(0); }, {prefix + ".bin", "sequence 0, position 1", "2.5"});
}

TEST_F(DataTest, EveryCorruptionNamesTheFile) {
  const std::string p = path("c");
  Bytes good_bin;
  for (uint16_t v : {1, 2, 3, 4, 5}) good_bin.u16(v);
  const Bytes good_idx = megatron_index(8, {2, 3}, {0, 4}, {0, 1, 2});
  auto write_pair = [&](const std::vector<uint8_t>& bin, const std::vector<uint8_t>& idx) {
    write_file(p + ".bin", bin);
    write_file(p + ".idx", idx);
  };
  auto open = [&] { IndexedDataset::open(p); };

  write_pair(good_bin.b, good_idx.b);
  EXPECT_NO_THROW(open());

  // Truncated index: inside the arrays, and inside the header.
  write_pair(good_bin.b, std::vector<uint8_t>(good_idx.b.begin(), good_idx.b.end() - 5));
  expect_error(open, {p + ".idx", "truncated"});
  write_pair(good_bin.b, std::vector<uint8_t>(good_idx.b.begin(), good_idx.b.begin() + 20));
  expect_error(open, {p + ".idx", "truncated"});
  // A huge declared count must not overflow the size arithmetic.
  Bytes huge;
  huge.raw("MMIDIDX\0\0", 9).u64(1).u8(8).u64(~uint64_t{0} / 4).u64(1);
  write_pair(good_bin.b, huge.b);
  expect_error(open, {p + ".idx", "truncated"});

  auto patched = [&](size_t at, uint8_t v) {
    auto b = good_idx.b;
    b[at] = v;
    return b;
  };
  write_pair(good_bin.b, patched(0, 'X'));
  expect_error(open, {p + ".idx", "magic"});
  write_pair(good_bin.b, patched(9, 2));
  expect_error(open, {p + ".idx", "version 2"});
  write_pair(good_bin.b, patched(17, 9));
  expect_error(open, {p + ".idx", "dtype code 9"});
  write_pair(good_bin.b, patched(17, 0));
  expect_error(open, {p + ".idx", "dtype code 0"});

  // .bin shorter / longer than the pointers say.
  write_pair(std::vector<uint8_t>(good_bin.b.begin(), good_bin.b.end() - 2), good_idx.b);
  expect_error(open, {p + ".bin", "truncated"});
  auto longer = good_bin.b;
  longer.push_back(0);
  longer.push_back(0);
  write_pair(longer, good_idx.b);
  expect_error(open, {p + ".bin", "another index"});

  // Pointers, lengths and document indices.
  write_pair(good_bin.b, megatron_index(8, {2, 3}, {4, 0}, {0, 1, 2}).b);
  expect_error(open, {p + ".idx", "not monotonic"});
  write_pair(good_bin.b, megatron_index(8, {2, 3}, {0, 2}, {0, 1, 2}).b);  // overlapping
  expect_error(open, {p + ".idx", "not monotonic"});
  write_pair(good_bin.b, megatron_index(8, {2, -3}, {0, 4}, {0, 1, 2}).b);
  expect_error(open, {p + ".idx", "negative length"});
  write_pair(good_bin.b, megatron_index(8, {2, 3}, {0, 4}, {0, 2, 1}).b);
  expect_error(open, {p + ".idx", "document index"});
  write_pair(good_bin.b, megatron_index(8, {2, 3}, {0, 4}, {0, 1}).b);
  expect_error(open, {p + ".idx", "documents end at sequence 1"});
  write_pair(good_bin.b, megatron_index(8, {2, 3}, {0, 4}, {1, 2}).b);
  expect_error(open, {p + ".idx", "start at 1"});
  auto trailing = good_idx.b;
  trailing.push_back(0);
  write_pair(good_bin.b, trailing);
  expect_error(open, {p + ".idx", "unexpected bytes"});

  // Missing files.
  write_pair(good_bin.b, good_idx.b);
  fs::remove(p + ".bin");
  expect_error(open, {p + ".bin", "missing"});
  write_pair(good_bin.b, good_idx.b);
  fs::remove(p + ".idx");
  expect_error(open, {p + ".idx", "missing"});
}

TEST_F(DataTest, EmptyDatasetOpens) {
  {
    IndexedDatasetWriter w(path("empty"), TokenDType::UInt16);
    w.finalize();
  }
  auto ds = IndexedDataset::open(path("empty"));
  EXPECT_EQ(ds->num_sequences(), 0);
  EXPECT_EQ(ds->num_documents(), 0);
  EXPECT_EQ(ds->num_tokens(), 0);
  EXPECT_EQ(ds->max_token_id(), 0);
  EXPECT_NO_THROW(check_vocab(*ds, 264));
  expect_error([&] { WindowSampler(ds, 4, 0, 1); }, {"fewer than one window"});
}

TEST_F(DataTest, CheckVocabNamesFileSequenceAndId) {
  const std::string prefix = path("vocab");
  {
    IndexedDatasetWriter w(prefix, TokenDType::UInt16);
    w.add_document({1, 2, 257});
    w.add_document({3, 4, 5, 257});
    w.add_document({6, 7, 8, 9, 10, 300, 257});
    w.finalize();
  }
  auto ds = IndexedDataset::open(prefix);
  EXPECT_NO_THROW(check_vocab(*ds, 301));
  expect_error([&] { check_vocab(*ds, 264); }, {prefix + ".bin", "sequence 2", "position 5", "300", "264"});
}

// ---------------------------------------------------------------------------------------------------
// Tokenizer

TEST(ByteTokenizer, RoundTrip) {
  ByteTokenizer tok;
  std::string all;
  for (int c = 0; c < 256; ++c) all.push_back(static_cast<char>(c));
  const std::string text = "Hello, wörld!\n" + all;
  const auto ids = tok.encode(text);
  ASSERT_EQ(ids.size(), text.size());
  for (int32_t id : ids) EXPECT_TRUE(id >= 0 && id < 256);
  EXPECT_EQ(ids[0], 'H');
  EXPECT_EQ(tok.decode(ids), text);

  const auto framed = tok.encode("ab", true, true);
  EXPECT_EQ(framed, (std::vector<int32_t>{ByteTokenizer::kBos, 'a', 'b', ByteTokenizer::kEos}));
  EXPECT_EQ(tok.decode(framed), "ab");
  EXPECT_EQ(tok.decode({ByteTokenizer::kBos, 'x', ByteTokenizer::kPad, 261, ByteTokenizer::kEos}, false),
            "<bos>x<pad><unk:261><eos>");
  EXPECT_EQ(tok.vocab_size(), 259);
  EXPECT_EQ(ByteTokenizer::kBos, 256);
  EXPECT_EQ(ByteTokenizer::kEos, 257);
  EXPECT_EQ(ByteTokenizer::kPad, 258);
}

// ---------------------------------------------------------------------------------------------------
// Sampler

TEST(EpochPermutation, IsABijectionAndDependsOnSeedAndEpoch) {
  for (uint64_t n : {1ULL, 2ULL, 3ULL, 5ULL, 16ULL, 17ULL, 63ULL, 1000ULL, 4097ULL}) {
    EpochPermutation p(n, 7, 0);
    std::vector<bool> hit(n, false);
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t y = p(i);
      ASSERT_LT(y, n);
      EXPECT_FALSE(hit[y]) << "n=" << n;
      hit[y] = true;
    }
  }
  auto order = [](uint64_t seed, uint64_t epoch) {
    EpochPermutation p(1000, seed, epoch);
    std::vector<uint64_t> v;
    for (uint64_t i = 0; i < 1000; ++i) v.push_back(p(i));
    return v;
  };
  EXPECT_EQ(order(1, 0), order(1, 0));
  EXPECT_NE(order(1, 0), order(1, 1));
  EXPECT_NE(order(1, 0), order(2, 0));
  // Fixed values: the order must never change across platforms, compilers or versions.
  EXPECT_EQ(splitmix64(0), 0xe220a8397b1dcdafULL);
}

class SamplerTest : public DataTest {
 protected:
  // Documents of varying lengths whose tokens are their global positions (int32), so every window
  // can be checked against its expected start.
  void SetUp() override {
    DataTest::SetUp();
    IndexedDatasetWriter w(path("pos"), TokenDType::Int32);
    int32_t at = 0;
    for (int32_t len : {1, 17, 100, 3, 250, 0, 29, 600}) {
      w.add_document(iota_vec(at, len));
      at += len;
    }
    w.finalize();
    ds_ = IndexedDataset::open(path("pos"));
    ASSERT_EQ(ds_->num_tokens(), 1000);
  }
  std::vector<int32_t> batches(WindowSampler& s, int steps, int64_t gb, int64_t rank = 0, int64_t dp = 1) {
    std::vector<int32_t> out;
    std::vector<int32_t> buf(static_cast<size_t>(gb / dp * s.window_length()));
    for (int i = 0; i < steps; ++i) {
      s.next_batch(gb, rank, dp, buf.data());
      out.insert(out.end(), buf.begin(), buf.end());
    }
    return out;
  }
  std::shared_ptr<const IndexedDataset> ds_;
};

TEST_F(SamplerTest, WindowsOverlapBySpec) {
  const int64_t S = 16, D = 1;
  WindowSampler s(ds_, S, D, 42);
  EXPECT_EQ(s.window_length(), S + D + 1);
  EXPECT_EQ(s.windows_per_epoch(), (1000 - D - 1) / S);  // 62
  std::vector<int32_t> a(18), b(18);
  for (int64_t w = 0; w < s.windows_per_epoch(); ++w) {
    s.read_window(w, a.data());
    EXPECT_EQ(a, iota_vec(static_cast<int32_t>(w * S), 18));
    if (w + 1 < s.windows_per_epoch()) {
      s.read_window(w + 1, b.data());
      EXPECT_TRUE(std::equal(a.end() - (D + 1), a.end(), b.begin()));  // D + 1 shared tokens
    }
  }
  // Every position but the first is a target exactly once per epoch: targets of window w are
  // positions w*S + 1 .. w*S + S.
  EXPECT_LE((s.windows_per_epoch() - 1) * S + S + D + 1, 1000);
  EXPECT_THROW(s.read_window(s.windows_per_epoch(), a.data()), Error);

  WindowSampler exact(ds_, 333, 0, 1);  // (1000 - 1) / 333 = 3: the last window ends at token 1000
  EXPECT_EQ(exact.windows_per_epoch(), 3);
  std::vector<int32_t> last(334);
  exact.read_window(2, last.data());
  EXPECT_EQ(last.back(), 999);
}

TEST_F(SamplerTest, DeterministicPerSeedAndEpochsArePermutations) {
  const int64_t S = 16, D = 1, M = (1000 - D - 1) / S;  // 62 windows
  WindowSampler a(ds_, S, D, 1234), b(ds_, S, D, 1234), c(ds_, S, D, 99);
  const auto sa = batches(a, 20, 8), sb = batches(b, 20, 8), sc = batches(c, 20, 8);
  EXPECT_EQ(sa, sb);
  EXPECT_NE(sa, sc);
  EXPECT_EQ(a.state().epoch, 160 / M);
  EXPECT_EQ(a.state().index, 160 % M);

  // The stream is epoch 0's permutation, then epoch 1's: each a full permutation, in different orders.
  std::vector<int64_t> starts;
  for (size_t i = 0; i < sa.size(); i += S + D + 1) starts.push_back(sa[i] / S);
  std::vector<int64_t> e0(starts.begin(), starts.begin() + M), e1(starts.begin() + M, starts.begin() + 2 * M);
  EXPECT_EQ(std::set<int64_t>(e0.begin(), e0.end()).size(), static_cast<size_t>(M));
  EXPECT_EQ(std::set<int64_t>(e1.begin(), e1.end()).size(), static_cast<size_t>(M));
  EXPECT_NE(e0, e1);
  for (int64_t i = 0; i < M; ++i) {
    EXPECT_EQ(e0[i], a.window_at(0, i));
    EXPECT_EQ(e1[i], a.window_at(1, i));
  }

  WindowSampler plain(ds_, S, D, 1234, {}, /*shuffle=*/false);
  for (int64_t i = 0; i < M; ++i) EXPECT_EQ(plain.window_at(3, i), i);
}

TEST_F(SamplerTest, DataParallelSlicesAreDisjointAndCoverTheGlobalBatch) {
  const int64_t S = 8, D = 2, W = S + D + 1, gb = 12;
  for (int64_t dp : {1, 2, 3, 4, 6, 12}) {
    SCOPED_TRACE(dp);
    WindowSampler whole(ds_, S, D, 5);
    const auto ref = batches(whole, 25, gb);  // crosses epochs: 300 windows, 124 per epoch
    std::vector<std::vector<int32_t>> per_rank;
    for (int64_t r = 0; r < dp; ++r) {
      WindowSampler s(ds_, S, D, 5);
      per_rank.push_back(batches(s, 25, gb, r, dp));
      EXPECT_EQ(s.state().epoch, whole.state().epoch);
      EXPECT_EQ(s.state().index, whole.state().index);
    }
    const size_t slice = static_cast<size_t>(gb / dp * W);
    for (size_t step = 0; step < 25; ++step) {
      std::vector<int32_t> joined;
      std::set<int32_t> starts;
      for (int64_t r = 0; r < dp; ++r) {
        auto first = per_rank[r].begin() + static_cast<int64_t>(step * slice);
        joined.insert(joined.end(), first, first + static_cast<int64_t>(slice));
        for (size_t k = 0; k < slice; k += W) starts.insert(*(first + static_cast<int64_t>(k)));
      }
      EXPECT_EQ(joined, std::vector<int32_t>(ref.begin() + static_cast<int64_t>(step * gb * W),
                                             ref.begin() + static_cast<int64_t>((step + 1) * gb * W)));
      // Within one epoch the windows of a global batch are distinct across ranks.
      if (step < 10) {
        EXPECT_EQ(starts.size(), static_cast<size_t>(gb));
      }
    }
  }
  WindowSampler s(ds_, S, D, 5);
  std::vector<int32_t> buf(100);
  EXPECT_THROW(s.next_batch(10, 0, 4, buf.data()), Error);  // 10 not divisible by 4
  EXPECT_THROW(s.next_batch(8, 4, 4, buf.data()), Error);   // rank out of range
}

TEST_F(SamplerTest, ResumeReproducesTheStream) {
  const int64_t S = 20, D = 1;
  WindowSampler a(ds_, S, D, 77);
  batches(a, 7, 6);  // 42 windows of 49 per epoch
  const SamplerState saved = a.state();
  const auto rest = batches(a, 9, 6);

  WindowSampler b(ds_, S, D, 77);
  b.restore(saved);
  EXPECT_EQ(batches(b, 9, 6), rest);
  EXPECT_EQ(b.state().epoch, a.state().epoch);
  EXPECT_EQ(b.state().index, a.state().index);
  expect_error([&] { b.restore({0, b.windows_per_epoch()}); }, {"cannot restore"});
  EXPECT_THROW(b.restore({-1, 0}), Error);
}

TEST_F(SamplerTest, TokenRangesAndTensorOutput) {
  const auto [train, valid] = split_train_valid(1000, 0.1);
  EXPECT_EQ(train.begin, 0);
  EXPECT_EQ(train.end, 900);
  EXPECT_EQ(valid.begin, 900);
  EXPECT_EQ(valid.end, 1000);
  EXPECT_EQ(split_train_valid(1000, 0.0).second.end - split_train_valid(1000, 0.0).second.begin, 0);

  WindowSampler v(ds_, 16, 1, 3, valid, false);
  EXPECT_EQ(v.windows_per_epoch(), (100 - 2) / 16);
  OwnedTensor out(DType::I32, {2, 18}, "tokens");
  v.next_batch(4, 1, 2, out);  // rank 1 of 2: windows 2 and 3 of the range
  EXPECT_EQ(out.i32()[0], 900 + 2 * 16);
  EXPECT_EQ(out.i32()[18], 900 + 3 * 16);
  OwnedTensor wrong(DType::I32, {2, 17}, "tokens");
  EXPECT_THROW(v.next_batch(4, 1, 2, wrong), Error);

  expect_error([&] { WindowSampler(ds_, 16, 1, 3, TokenRange{990, 1000}); }, {"fewer than one window"});
  expect_error([&] { WindowSampler(ds_, 16, 1, 3, TokenRange{0, 1001}); }, {"outside"});
}

TEST_F(DataTest, OpenDataSources) {
  auto make = [&](const std::string& prefix, int32_t n) {
    IndexedDatasetWriter w(prefix, TokenDType::UInt16);
    w.add_document(iota_vec(0, n));
    w.finalize();
  };
  make(path("plain"), 200);
  auto one = open_data_sources(path("plain"), 0.25);
  EXPECT_EQ(one.train_range.end, 150);
  ASSERT_NE(one.valid, nullptr);
  EXPECT_EQ(one.valid.get(), one.train.get());
  EXPECT_EQ(one.valid_range.begin, 150);
  EXPECT_EQ(open_data_sources(path("plain"), 0.0).valid, nullptr);

  make(path("pair_train"), 300);
  make(path("pair_valid"), 40);
  auto two = open_data_sources(path("pair"), 0.5);
  EXPECT_EQ(two.train->num_tokens(), 300);
  EXPECT_EQ(two.train_range.end, 300);
  ASSERT_NE(two.valid, nullptr);
  EXPECT_EQ(two.valid->num_tokens(), 40);
  expect_error([&] { open_data_sources(path("none"), 0.1); }, {path("none"), "dsv3-data"});
}
