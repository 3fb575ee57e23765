// C++ unit tests of the compaction core (csrc/compaction.cpp) and of its registration as
// adainfer::* ops, through the CMake build (ctest). The Python tests cover the same ops through
// torch.ops with property tests; these pin the C++ routines without Python in the loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <string>
#include <tuple>
#include <vector>

#include "compaction.h"
#include "test_registry.h"

namespace {

// Runs `body` and expects it to throw exactly the c10 error type `Error` (which Python sees as the
// matching exception: c10::TypeError -> TypeError, c10::ValueError -> ValueError, ...).
template <typename Error, typename Body>
void expect_throws(Body body, const char* what) {
  try {
    body();
  } catch (const Error&) {
    return;
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string(what) + ": threw the wrong error type: " + e.what());
  }
  throw std::runtime_error(std::string(what) + ": did not throw");
}

at::Tensor mask_of(std::vector<bool> flags) {
  at::Tensor t = at::empty({static_cast<int64_t>(flags.size())}, at::kBool);
  for (size_t i = 0; i < flags.size(); ++i)
    t[static_cast<int64_t>(i)] = static_cast<bool>(flags[i]);
  return t;
}

at::Tensor longs(std::vector<int64_t> values) {
  return at::tensor(values, at::TensorOptions().dtype(at::kLong));
}

}  // namespace

ADAINFER_TEST(rows_are_contiguous_follows_the_trailing_layout) {
  const at::Tensor x = at::randn({4, 3, 5});
  ADAINFER_EXPECT(adainfer::rows_are_contiguous(x));
  ADAINFER_EXPECT(
      adainfer::rows_are_contiguous(x.slice(0, 0, 4, 2)));  // every other row: still memcpy-able
  ADAINFER_EXPECT(
      !adainfer::rows_are_contiguous(x.transpose(1, 2)));  // a transposed K/V-style view
  ADAINFER_EXPECT(
      adainfer::rows_are_contiguous(x.select(1, 0).unsqueeze(1)));  // size-1 dims are free
  ADAINFER_EXPECT(
      adainfer::rows_are_contiguous(at::ones({1, 5}).expand({4, 5})));  // dim-0 stride 0
  ADAINFER_EXPECT(!adainfer::rows_are_contiguous(at::ones({4, 1, 1, 5}).expand({4, 1, 5, 5})));
}

ADAINFER_TEST(copy_rows_cpu_gathers_and_scatters_any_dtype) {
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf, at::kLong, at::kBool}) {
    const at::Tensor src = at::randint(0, 2, {6, 3, 7}).to(dtype);
    const at::Tensor index = longs({5, 0, 3});
    at::Tensor gathered = adainfer::empty_rows_like(src, 3);
    adainfer::copy_rows_cpu(src, index.data_ptr<int64_t>(), gathered, nullptr, 3);
    ADAINFER_EXPECT(at::equal(gathered, src.index_select(0, index)));

    at::Tensor scattered = at::zeros_like(src);
    adainfer::copy_rows_cpu(gathered, nullptr, scattered, index.data_ptr<int64_t>(), 3);
    ADAINFER_EXPECT(at::equal(scattered.index_select(0, index), gathered));
    ADAINFER_EXPECT(at::equal(scattered[1], at::zeros_like(src[1])));
  }
}

ADAINFER_TEST(run_row_copies_cpu_splits_work_anywhere_in_a_row) {
  // Several jobs of odd row sizes (one empty) in one region; with a 1-byte grain and 2..4 threads
  // the thread ranges start and end inside rows and across job boundaries.
  const at::Tensor a = at::randn({5, 7});
  const at::Tensor b = at::randint(0, 100, {4, 3}, at::kLong);
  const at::Tensor c = at::rand({6, 5}) > 0.5;
  const at::Tensor none = at::randn({0, 3});
  const at::Tensor ia = longs({4, 0, 2});
  const at::Tensor ic = longs({5, 1});
  const int saved = at::get_num_threads();
  for (int threads = 1; threads <= 4; ++threads) {
    at::set_num_threads(threads);
    at::Tensor oa = adainfer::empty_rows_like(a, 3);
    at::Tensor ob = at::zeros({6, 3}, at::kLong);
    at::Tensor oc = adainfer::empty_rows_like(c, 2);
    at::Tensor on = adainfer::empty_rows_like(none, 0);
    const at::Tensor ib = longs({5, 3, 0, 2});
    adainfer::run_row_copies_cpu(
        {adainfer::row_copy_job(a, ia.data_ptr<int64_t>(), oa, nullptr, 3),
         adainfer::row_copy_job(none, nullptr, on, nullptr, 0),
         adainfer::row_copy_job(b, nullptr, ob, ib.data_ptr<int64_t>(), 4),
         adainfer::row_copy_job(c, ic.data_ptr<int64_t>(), oc, nullptr, 2)},
        /*grain_bytes=*/1);
    ADAINFER_EXPECT(at::equal(oa, a.index_select(0, ia)));
    ADAINFER_EXPECT(at::equal(ob.index_select(0, ib), b));
    ADAINFER_EXPECT(at::equal(ob[1], at::zeros({3}, at::kLong)) &&
                    at::equal(ob[4], at::zeros({3}, at::kLong)));
    ADAINFER_EXPECT(at::equal(oc, c.index_select(0, ic)));
  }
  at::set_num_threads(saved);
}

ADAINFER_TEST(copy_rows_cpu_splits_large_rows_and_reads_strided_rows) {
  // 400 KB rows, more than one thread's grain, so ranges split inside rows; the source is every
  // other row of a bigger buffer, so its dim-0 stride is twice the row size.
  const at::Tensor buffer = at::randn({8, 100000});
  const at::Tensor src = buffer.slice(0, 0, 8, 2);
  const at::Tensor index = longs({3, 1});
  at::Tensor out = adainfer::empty_rows_like(src, 2);
  adainfer::copy_rows_cpu(src, index.data_ptr<int64_t>(), out, nullptr, 2);
  ADAINFER_EXPECT(at::equal(out, src.index_select(0, index)));
}

ADAINFER_TEST(compact_rows_cpu_keeps_order_and_accounts_for_every_row) {
  const at::Tensor keep = mask_of({true, false, false, true, true, false});
  const at::Tensor row_map = longs({10, 11, 12, 13, 14, 15});
  const at::Tensor hidden = at::randn({6, 4, 8}).to(at::kBFloat16);
  const at::Tensor mask4 = at::rand({6, 1, 4, 4}) > 0.5;
  const at::Tensor expanded = at::arange(4).expand({6, 4});            // strided: dim-0 stride 0
  const at::Tensor transposed = at::randn({6, 8, 4}).transpose(1, 2);  // not row-contiguous
  auto [out, kept_rows, kept, finished, finished_rows] =
      adainfer::compact_rows_cpu(keep, row_map, {hidden, mask4, expanded, transposed});
  ADAINFER_EXPECT(at::equal(kept, longs({0, 3, 4})));
  ADAINFER_EXPECT(at::equal(finished, longs({1, 2, 5})));
  ADAINFER_EXPECT(at::equal(kept_rows, longs({10, 13, 14})));
  ADAINFER_EXPECT(at::equal(finished_rows, longs({11, 12, 15})));
  ADAINFER_EXPECT(out.size() == 4);
  const std::vector<at::Tensor> inputs = {hidden, mask4, expanded, transposed};
  for (size_t i = 0; i < inputs.size(); ++i) {
    ADAINFER_EXPECT(at::equal(out[i], inputs[i].index({keep})));
    ADAINFER_EXPECT(out[i].is_contiguous());
  }
}

ADAINFER_TEST(large_outputs_take_the_aten_path_with_the_same_result) {
  // >= 32 MiB of output: written by ATen's index_select / index_copy_ instead of memcpy jobs.
  const at::Tensor big = at::randn({10, 1 << 20});  // 4 MiB rows
  const at::Tensor small = at::arange(10).view({10, 1});
  const at::Tensor keep = mask_of({true, true, false, true, true, true, true, true, true, true});
  auto result = adainfer::compact_rows_cpu(keep, at::arange(10), {big, small});
  ADAINFER_EXPECT(std::get<0>(result)[0].nbytes() >= (size_t{32} << 20));
  ADAINFER_EXPECT(at::equal(std::get<0>(result)[0], big.index({keep})));
  ADAINFER_EXPECT(at::equal(std::get<0>(result)[1], small.index({keep})));
  const at::Tensor merged = adainfer::merge_rows_cpu(big.slice(0, 0, 6), longs({9, 0, 8, 1, 7, 2}),
                                                     big.slice(0, 6, 10), longs({3, 6, 4, 5}), 10);
  const at::Tensor order =
      longs({1, 3, 5, 6, 8, 9, 7, 4, 2, 0});  // row r of merged = big[order[r]]
  ADAINFER_EXPECT(at::equal(merged, big.index_select(0, order)));
}

ADAINFER_TEST(compact_rows_cpu_handles_no_rows_all_kept_and_none_kept) {
  const at::Tensor none = at::empty({0}, at::kBool);
  auto empty = adainfer::compact_rows_cpu(none, at::empty({0}, at::kLong), {at::empty({0, 3})});
  ADAINFER_EXPECT(std::get<0>(empty)[0].sizes() == at::IntArrayRef({0, 3}));
  ADAINFER_EXPECT(std::get<3>(empty).numel() == 0);

  const at::Tensor x = at::randn({3, 2});
  auto all = adainfer::compact_rows_cpu(mask_of({true, true, true}), longs({2, 0, 1}), {x});
  ADAINFER_EXPECT(at::equal(std::get<0>(all)[0], x));
  ADAINFER_EXPECT(std::get<0>(all)[0].data_ptr() != x.data_ptr());  // a copy, never an alias
  ADAINFER_EXPECT(std::get<4>(all).numel() == 0);

  auto gone = adainfer::compact_rows_cpu(mask_of({false, false, false}), longs({2, 0, 1}), {x});
  ADAINFER_EXPECT(std::get<0>(gone)[0].sizes() == at::IntArrayRef({0, 2}));
  ADAINFER_EXPECT(at::equal(std::get<4>(gone), longs({2, 0, 1})));
}

ADAINFER_TEST(compact_rows_checks_its_arguments) {
  const at::Tensor keep = mask_of({true, false});
  const at::Tensor row_map = longs({0, 1});
  const at::Tensor x = at::randn({2, 3});
  expect_throws<c10::TypeError>(
      [&] { adainfer::compact_rows_cpu(keep.to(at::kInt), row_map, {x}); }, "int mask");
  expect_throws<c10::ValueError>(
      [&] { adainfer::compact_rows_cpu(keep.view({1, 2}), row_map, {x}); }, "2-D mask");
  expect_throws<c10::TypeError>(
      [&] { adainfer::compact_rows_cpu(keep, row_map.to(at::kInt), {x}); }, "int map");
  expect_throws<c10::ValueError>([&] { adainfer::compact_rows_cpu(keep, longs({0, 1, 2}), {x}); },
                                 "map length");
  expect_throws<c10::ValueError>(
      [&] { adainfer::compact_rows_cpu(keep, row_map, {at::randn({3, 3})}); }, "rows");
  expect_throws<c10::ValueError>(
      [&] { adainfer::compact_rows_cpu(keep, row_map, {at::randn({})}); }, "0-d");
  expect_throws<c10::ValueError>(
      [&] { adainfer::compact_rows_cpu(keep, row_map, {at::randn({2, 3}).to_sparse()}); },
      "sparse");
}

ADAINFER_TEST(merge_rows_cpu_builds_a_permutation_and_refuses_anything_else) {
  const at::Tensor active = at::randn({2, 3, 4});
  const at::Tensor fill = at::randn({3, 3, 4});
  const at::Tensor merged =
      adainfer::merge_rows_cpu(active, longs({4, 1}), fill, longs({0, 3, 2}), 5);
  ADAINFER_EXPECT(at::equal(merged[4], active[0]) && at::equal(merged[1], active[1]));
  ADAINFER_EXPECT(at::equal(merged[0], fill[0]) && at::equal(merged[3], fill[1]) &&
                  at::equal(merged[2], fill[2]));
  // The same through the strided path (transposed values, as K/V views often are).
  const at::Tensor merged_t =
      adainfer::merge_rows_cpu(active.transpose(1, 2).contiguous().transpose(1, 2), longs({4, 1}),
                               fill, longs({0, 3, 2}), 5);
  ADAINFER_EXPECT(at::equal(merged_t, merged));

  expect_throws<c10::IndexError>(
      [&] { adainfer::merge_rows_cpu(active, longs({4, 1}), fill, longs({0, 1, 2}), 5); },
      "repeated row");
  expect_throws<c10::IndexError>(
      [&] { adainfer::merge_rows_cpu(active, longs({5, 1}), fill, longs({0, 3, 2}), 5); },
      "row out of range");
  expect_throws<c10::ValueError>(
      [&] { adainfer::merge_rows_cpu(active, longs({4, 1}), fill, longs({0, 3, 2}), 6); },
      "batch size");
  expect_throws<c10::TypeError>(
      [&] {
        adainfer::merge_rows_cpu(active, longs({4, 1}), fill.to(at::kHalf), longs({0, 3, 2}), 5);
      },
      "dtype");
  expect_throws<c10::ValueError>(
      [&] {
        adainfer::merge_rows_cpu(active, longs({4, 1}), at::randn({3, 4, 3}), longs({0, 3, 2}), 5);
      },
      "shape");
}

ADAINFER_TEST(scatter_rows_cpu_writes_in_place_and_refuses_bad_rows) {
  at::Tensor out = at::zeros({4, 2});
  const at::Tensor values = at::randn({2, 2});
  adainfer::scatter_rows_cpu(out, longs({3, 0}), values);
  ADAINFER_EXPECT(at::equal(out[3], values[0]) && at::equal(out[0], values[1]));
  ADAINFER_EXPECT(at::equal(out[1], at::zeros({2})));
  expect_throws<c10::IndexError>([&] { adainfer::scatter_rows_cpu(out, longs({1, 1}), values); },
                                 "repeat");
  expect_throws<c10::IndexError>([&] { adainfer::scatter_rows_cpu(out, longs({-1, 1}), values); },
                                 "negative");
  expect_throws<c10::Error>(
      [&] {
        adainfer::scatter_rows_cpu(at::zeros({1, 2}).expand({4, 2}), longs({0}),
                                   values[0].unsqueeze(0));
      },
      "expanded out");
}

ADAINFER_TEST(ops_are_registered_with_the_dispatcher) {
  // The Python wrappers and torch.compile reach the kernels through these schemas.
  const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("adainfer::compact_rows", "")
          .typed<adainfer::CompactResult(const at::Tensor&, const at::Tensor&, at::TensorList)>();
  const at::Tensor x = at::arange(6).view({3, 2});
  auto result = op.call(mask_of({false, true, true}), longs({7, 8, 9}), {x});
  ADAINFER_EXPECT(at::equal(std::get<0>(result)[0], x.slice(0, 1, 3)));
  ADAINFER_EXPECT(at::equal(std::get<4>(result), longs({7})));
  ADAINFER_EXPECT(
      c10::Dispatcher::singleton().findSchema({"adainfer::scatter_rows", ""}).has_value());
  ADAINFER_EXPECT(
      c10::Dispatcher::singleton().findSchema({"adainfer::merge_rows", ""}).has_value());
}
